"""A headless Chromium driven over the Chrome DevTools Protocol (CDP), for the host lane's browser tests.

No browser is ever downloaded: the test uses a Chromium that is already installed ($CHROMIUM, then `chromium`,
`chromium-browser`, `google-chrome` on PATH). CDP is spoken directly over one websocket with aiohttp (a ComfyUI
requirement, so it is in every host's Python); an asyncio loop runs in a background thread so the tests stay
plain synchronous functions.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-dev-shm-usage", "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*",
)


def find_chromium() -> str | None:
    """$CHROMIUM if set (a path or a name on PATH), else the first of CHROMIUM_NAMES on PATH."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return shutil.which(configured) or (configured if os.access(configured, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    pass


@dataclass
class PageEvent:
    """One thing the page reported that a test may want to see: a console message, an uncaught exception, a
    browser log entry or a failed request. `kind` is 'console', 'exception', 'log' or 'network'."""

    kind: str
    level: str
    text: str
    url: str = ""

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"[{self.kind}:{self.level}] {self.text}{where}"


@dataclass
class EventLog:
    events: list[PageEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: PageEvent) -> None:
        with self.lock:
            self.events.append(event)

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def since(self, mark: int = 0) -> list[PageEvent]:
        with self.lock:
            return list(self.events[mark:])


def _remote_object_text(value: dict) -> str:
    if "value" in value:
        return value["value"] if isinstance(value["value"], str) else json.dumps(value["value"])
    return value.get("description") or value.get("unserializableValue") or value.get("type", "?")


class Chromium:
    """A headless Chromium with one page attached over CDP.

    Use as a context manager: the browser and its whole process group are killed on exit, whatever happened.
    `evaluate` runs JavaScript in the page (promises awaited, the result returned by value); everything the page
    reports (console.error / warning, uncaught exceptions, browser log errors, failed or >= 400 requests) lands in
    `self.log`, so a test can take `mark()` before an action and look at `since(mark)` after it.
    """

    def __init__(self, executable: str, width: int = 1600, height: int = 1000, start_timeout: float = 60):
        self.executable = executable
        self.width, self.height = width, height
        self.start_timeout = start_timeout
        self.log = EventLog()
        self.process: subprocess.Popen | None = None
        self._profile: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._session_id: str | None = None
        self._requests: dict[str, str] = {}
        self._http = None
        self._socket = None
        self._reader = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="mv4d-chromium-")
        stderr = open(Path(self._profile) / "chromium-stderr.log", "wb")
        command = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                   f"--window-size={self.width},{self.height}", "about:blank"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                        start_new_session=True)
        stderr.close()
        websocket_url = self._wait_for_devtools_url()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._thread.start()
        self._run(self._connect(websocket_url), timeout=30)

    def _wait_for_devtools_url(self) -> str:
        """Chromium prints 'DevTools listening on ws://...' on stderr once the debugging port is open."""
        stderr_path = Path(self._profile) / "chromium-stderr.log"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for line in stderr_path.read_text(errors="replace").splitlines():
                if line.startswith("DevTools listening on "):
                    return line.split(" ", 3)[3].strip()
            if self.process.poll() is not None:
                raise CDPError(f"{self.executable} exited with {self.process.returncode} before opening DevTools:\n"
                               f"{self.stderr_tail()}")
            time.sleep(0.1)
        raise CDPError(f"{self.executable} did not open DevTools within {self.start_timeout} s:\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 30) -> str:
        if not self._profile:
            return ""
        path = Path(self._profile) / "chromium-stderr.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._run(self._disconnect(), timeout=10)
            except Exception:  # noqa: BLE001 - tearing down; the process is killed below anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None
        if self.process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # helpers left in the group after the main process exited
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # -- the CDP connection (runs on the background loop) --------------------------------------------------
    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, timeout), self._loop).result()

    async def _connect(self, websocket_url: str) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession()
        self._socket = await self._http.ws_connect(websocket_url, max_msg_size=0, heartbeat=None)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        # the about:blank page Chromium opened at start; a new one if there is none
        pages = [target for target in (await self._send("Target.getTargets", {}))["targetInfos"] if target["type"] == "page"]
        target_id = pages[0]["targetId"] if pages else (await self._send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self._send("Target.attachToTarget", {"targetId": target_id, "flatten": True})
        self._session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self._send(f"{domain}.enable", {}, session=True)
        await self._send("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._socket is not None:
            await self._socket.close()
        if self._http is not None:
            await self._http.close()

    async def _send(self, method: str, params: dict, session: bool = False) -> dict:
        message_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        message = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session_id
        await self._socket.send_str(json.dumps(message))
        return await future

    async def _read(self) -> None:
        import aiohttp

        try:
            async for message in self._socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        if "error" in data:
                            future.set_exception(CDPError(f"{data['error'].get('message')}: {data['error'].get('data', '')}"))
                        else:
                            future.set_result(data.get("result", {}))
                elif data.get("sessionId") == self._session_id:
                    self._on_event(data["method"], data.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert", "warning"):
            text = " ".join(_remote_object_text(arg) for arg in params.get("args", []))
            frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.log.add(PageEvent("console", params["type"], text, frames[0].get("url", "")))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = _remote_object_text(details["exception"]) if "exception" in details else details.get("text", "")
            self.log.add(PageEvent("exception", "error", text, details.get("url", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            self.log.add(PageEvent("log", entry["level"], entry["text"], entry.get("url", "")))
        elif method == "Network.requestWillBeSent":
            self._requests[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            response = params["response"]
            self.log.add(PageEvent("network", "error", f"HTTP {response['status']} {response.get('statusText', '')}".strip(),
                                   response["url"]))
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.log.add(PageEvent("network", "error", f"request failed: {params.get('errorText', '')}",
                                   self._requests.get(params["requestId"], "")))

    # -- what the tests call -------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        """One CDP command on the page's session."""
        return self._run(self._send(method, params or {}, session=True), timeout)

    def navigate(self, url: str, timeout: float = 60) -> None:
        result = self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float = 60):
        """Evaluate a JavaScript expression in the page; a promise is awaited; the value comes back as JSON."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                                "userGesture": True}, timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = _remote_object_text(details["exception"]) if "exception" in details else details.get("text", "")
            raise CDPError(f"JavaScript threw: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, poll: float = 0.25):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except CDPError as error:
                last_error = error
            time.sleep(poll)
        raise TimeoutError(f"{what}: not true within {timeout} s ({expression!r}; last error: {last_error})")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
