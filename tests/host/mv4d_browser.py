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
    "--disable-dev-shm-usage", "--mute-audio", "--remote-debugging-port=0",
    # WebGL2 in software (SwiftShader through ANGLE) for the 4D player's tests: --disable-gpu keeps the GPU
    # process off real hardware, and Chromium only falls back to SwiftShader for WebGL when told it may
    "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
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
class PageRequest:
    """A request the page made: its URL and the script that made it (the innermost script URL on the initiator's
    stack, or the initiating document; '' when Chromium names none)."""

    url: str
    initiator: str


@dataclass
class PageEvent:
    """One thing the page reported that a test may want to see: a console message, an uncaught exception, a
    browser log entry, a failed request or a JavaScript dialog. `kind` is 'console', 'exception', 'log', 'network'
    or 'dialog' (alert, confirm, prompt: level error; beforeunload: level info)."""

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

    def __init__(self, executable: str, width: int = 1600, height: int = 1000, start_timeout: float = 60,
                 extra_flags: tuple[str, ...] = ()):
        self.executable = executable
        self.extra_flags = tuple(extra_flags)
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
        self._context_id: str | None = None
        self._requests: dict[str, str] = {}
        self.requested: list[PageRequest] = []  # every request the page made, in order
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
        command = [self.executable, *CHROMIUM_FLAGS, *self.extra_flags, f"--user-data-dir={self._profile}",
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
        await self._open_page()

    async def _open_page(self) -> None:
        """A new page in a new browser context (its own storage, like a fresh profile); the previous context and
        its page are thrown away without running their unload handlers."""
        previous = self._context_id
        self._context_id = (await self._send("Target.createBrowserContext", {}))["browserContextId"]
        target = await self._send("Target.createTarget", {"url": "about:blank", "browserContextId": self._context_id})
        attached = await self._send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        self._session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self._send(f"{domain}.enable", {}, session=True)
        await self._send("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, session=True)
        if previous is not None:
            await self._send("Target.disposeBrowserContext", {"browserContextId": previous})

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
        elif method == "Page.javascriptDialogOpening":
            # answer at once, or the page (and a navigation away from it: ComfyUI asks 'leave the unsaved
            # workflow?' in beforeunload) waits forever; an alert / confirm / prompt is worth reporting
            asyncio.get_running_loop().create_task(self._send("Page.handleJavaScriptDialog", {"accept": True}, session=True))
            level = "info" if params["type"] == "beforeunload" else "error"
            self.log.add(PageEvent("dialog", level, f"{params['type']}: {params.get('message', '')}", params.get("url", "")))
        elif method == "Network.requestWillBeSent":
            self._requests[params["requestId"]] = params["request"]["url"]
            initiator = params.get("initiator") or {}
            frames = [frame for frame in (initiator.get("stack") or {}).get("callFrames", []) if frame.get("url")]
            self.requested.append(PageRequest(params["request"]["url"], frames[0]["url"] if frames else initiator.get("url", "")))
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

    def new_page(self, timeout: float = 60) -> None:
        """Replace the page with a blank one in a fresh browser context (no storage, no history); events of the
        old page are no longer collected."""
        self._run(self._open_page(), timeout)

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


# -- ComfyUI's frontend ------------------------------------------------------------------------------------
# Only what the three frontends we test (1.27, 1.35, 1.47: ComfyUI 0.3.64, 0.8.0, 0.29.0) all have: window.app
# (ComfyApp), window.LiteGraph, app.loadGraphData(json, clean, restore_view, workflow_name, options),
# app.graphToPrompt(), app.registerExtension and its afterConfigureGraph(missingNodeTypes) hook, app.api.apiURL,
# app.extensionManager.command.execute, and the Pinia stores of the Vue app (#vue-app).

APP_READY = """!!(window.app && window.LiteGraph && app.graph && app.canvas && app.extensionManager
    && app.extensionManager.command && LiteGraph.registered_node_types[%s])"""

# Records the node types the frontend found missing at each graph load (all three call afterConfigureGraph with them).
INSTALL_PROBE = """(() => {
    if (!window.__mv4dProbe) {
        window.__mv4dProbe = {missingNodeTypes: []};
        app.registerExtension({name: 'mv4d.tests.browserProbe', afterConfigureGraph(missing) {
            window.__mv4dProbe.missingNodeTypes.push(JSON.parse(JSON.stringify(missing ?? [])));
        }});
    }
    return true;
})()"""

# Fetch a template the way the template browser does (api.apiURL('/workflow_templates/<module>/<name>.json')),
# load it the way it does (a clean graph, the view restored, the template's name as the workflow's name).
LOAD_TEMPLATE = """(async (module, name) => {
    const url = app.api.apiURL(`/workflow_templates/${module}/${name}.json`);
    const response = await fetch(url);
    if (!response.ok) return {url, error: `GET ${url}: HTTP ${response.status}`};
    const workflow = await response.json();
    const registered = LiteGraph.registered_node_types;
    const unregistered = workflow.nodes.filter(node => !(node.type in registered)).map(node => `${node.id}:${node.type}`);
    window.__mv4dProbe.missingNodeTypes = [];
    await app.loadGraphData(workflow, true, true, name, {openSource: 'template'});
    const graph = app.graph;
    return {
        url, unregistered,
        missingNodeTypes: window.__mv4dProbe.missingNodeTypes.flat().map(item => typeof item === 'string' ? item : item.type),
        nodes: graph.nodes.map(node => ({id: String(node.id), type: node.type, registered: node.type in registered,
                                         errors: !!node.has_errors})),
        templateNodeIds: workflow.nodes.map(node => String(node.id)),
    };
})(%s, %s)"""

# Texts of the open PrimeVue dialogs (missing nodes / missing models in 1.27 and 1.35 are dialogs).
DIALOG_TEXTS = "Array.from(document.querySelectorAll('.p-dialog')).map(dialog => dialog.innerText)"

# 1.47 shows no dialog for missing nodes / models: it keeps them in Pinia stores shown by an errors panel.
MISSING_IN_STORES = """(() => {
    const pinia = document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia;
    const stores = pinia ? pinia._s : new Map();
    const models = stores.get('missingModel')?.missingModelCandidates ?? null;
    const nodes = stores.get('missingNodesError')?.missingNodesError ?? null;
    return {
        models: models === null ? null : models.filter(model => model.isMissing === true).map(model => model.name),
        nodeTypes: nodes === null ? null : (nodes.nodeTypes ?? []).map(item => typeof item === 'string' ? item : item.type),
    };
})()"""

CLOSE_DIALOGS = """(() => {
    const pinia = document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia;
    const dialogs = pinia?._s.get('dialog');
    if (!dialogs) return 0;
    const keys = dialogs.dialogStack.map(dialog => dialog.key);
    for (const key of keys) dialogs.closeDialog({key});
    return keys.length;
})()"""

# Fit the whole graph in view, drawn in full detail even when zoomed out (no low-quality boxes without text);
# newer frontends animate the fit, so wait until the view stops moving.
FIT_VIEW = """(async () => {
    if ('min_font_size_for_lod' in app.canvas) app.canvas.min_font_size_for_lod = 0;
    await app.extensionManager.command.execute('Comfy.Canvas.FitView');
    const frame = () => new Promise(resolve => requestAnimationFrame(resolve));
    const view = () => JSON.stringify([Array.from(app.canvas.ds.offset), app.canvas.ds.scale]);
    let last = view(), still = 0;
    for (let i = 0; i < 600 && still < 10; i++) {
        await frame();
        const now = view();
        still = now === last ? still + 1 : 0;
        last = now;
    }
    app.graph.setDirtyCanvas(true, true);
    await frame(); await frame();
    return still >= 10;
})()"""


def js(value) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


class ComfyFrontend:
    """ComfyUI's own web frontend, served by `server_url`, in a `Chromium` page."""

    def __init__(self, browser: Chromium, server_url: str, probe_node_type: str):
        self.browser = browser
        self.server_url = server_url
        self.probe_node_type = probe_node_type

    def open(self, timeout: float = 120) -> list[PageEvent]:
        """Load the app in a fresh page of a fresh browser context (nothing kept from an earlier visit) and wait
        until it is ready; returns what it reported while booting."""
        self.browser.new_page()
        mark = self.browser.log.mark()
        self.browser.navigate(self.server_url + "/")
        self.browser.wait_for(APP_READY % js(self.probe_node_type), timeout,
                              f"ComfyUI's frontend at {self.server_url} ready with {self.probe_node_type} registered")
        self.browser.evaluate(INSTALL_PROBE)
        # let the boot finish what it does asynchronously (1.47 checks the models of its default graph, fetching
        # their URLs), so none of it lands in what a test measures next
        self.settle()
        return self.browser.log.since(mark)

    def load_template(self, module: str, name: str) -> dict:
        return self.browser.evaluate(LOAD_TEMPLATE % (js(module), js(name)), timeout=120)

    def graph_to_prompt(self) -> dict:
        return self.browser.evaluate("app.graphToPrompt().then(prompt => prompt.output)")

    def dialog_texts(self) -> list[str]:
        return self.browser.evaluate(DIALOG_TEXTS)

    def missing_in_stores(self) -> dict:
        return self.browser.evaluate(MISSING_IN_STORES)

    def missing_models_report(self) -> str:
        """What the frontend shows about missing models: its dialogs' text (1.27, 1.35) and the names in its
        missing-model store (1.47)."""
        return "\n".join(self.dialog_texts() + (self.missing_in_stores()["models"] or []))

    def wait_for_missing_models(self, names: list[str], timeout: float) -> str:
        """Wait until every name appears in `missing_models_report()` (the dialog opens after the load); returns
        the last report either way."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.missing_models_report()
            if all(name in report for name in names) or time.monotonic() > deadline:
                return report
            time.sleep(0.25)

    def close_dialogs(self) -> int:
        return self.browser.evaluate(CLOSE_DIALOGS)

    def fit_view(self) -> None:
        self.browser.evaluate(FIT_VIEW)

    def settle(self, quiet: float = 1.5, timeout: float = 20) -> None:
        """Wait until the page has reported nothing new for `quiet` seconds (at most `timeout`): late dialogs,
        requests and errors of a load land before the test looks."""
        deadline = time.monotonic() + timeout
        count, since = self.browser.log.mark(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.browser.log.mark()
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
