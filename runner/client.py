"""Talking to one ComfyUI server over its HTTP API and websocket (the routes of ComfyUI's server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from .answers import (HistoryEntry, OutputFile, ServerError, Uploaded, history_answer, object_info_answer, prompt_answer,
                      queue_answer, upload_answer)
from .errors import RunnerError

# Per HTTP request: connecting must be quick; an answer may take long (a big /object_info, a large download),
# but not forever. The websocket has no read limit (a run can be silent for long) and relies on heartbeats.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=300)
WEBSOCKET_HEARTBEAT_S = 30
DOWNLOAD_CHUNK = 1 << 20
PARTIAL_SUFFIX = ".part"  # a download (or manifest) being written: '.<name>.<random>.part' beside its final name


class ServerUnreachable(RunnerError):
    """No connection to the server (down, wrong address, or it stopped answering)."""


class PromptRejected(Exception):
    """POST /prompt refused the workflow (HTTP 400): `answer` holds its `error` and `node_errors`."""

    def __init__(self, answer: dict):
        super().__init__("the server refused the workflow")
        self.answer = answer


def server_label(url: str) -> str:
    """host:port, for progress lines."""
    return urlsplit(url).netloc or url


class ComfyClient:
    def __init__(self, url: str, session: aiohttp.ClientSession):
        self.url = url.rstrip("/")
        self.session = session
        self.label = server_label(self.url)

    def unreachable(self, error: Exception) -> ServerUnreachable:
        reason = getattr(getattr(error, "os_error", None), "strerror", None) or str(error) or type(error).__name__
        return ServerUnreachable(f"cannot reach ComfyUI at {self.url} ({reason}): is it running? start it, or pass "
                                 "--start-server with COMFYUI_DIR")

    async def request_json(self, method: str, path: str, **kwargs):
        """The JSON answer of one request; an empty answer (plain 200) is None."""
        try:
            async with self.session.request(method, self.url + path, timeout=REQUEST_TIMEOUT, **kwargs) as response:
                body = await response.read()
                if response.status != 200:
                    raise ServerError(f"{method} {path} on {self.url} answered HTTP {response.status}: "
                                      f"{body[:300].decode(errors='replace')}")
        except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, aiohttp.ServerDisconnectedError) as error:
            raise self.unreachable(error) from error
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError as error:
            raise ServerError(f"{method} {path} on {self.url} did not answer JSON: {body[:120]!r}") from error

    async def system_stats(self) -> dict:
        return await self.request_json("GET", "/system_stats")

    async def object_info(self) -> dict:
        return object_info_answer(await self.request_json("GET", "/object_info"), f"GET /object_info on {self.url}")

    async def upload(self, path: Path, subfolder: str) -> Uploaded:
        """Upload a file into ComfyUI's input folder (/upload/image takes any file: images, videos); an
        existing file of that name is replaced. Returns where the server put it."""
        with open(path, "rb") as file:
            form = aiohttp.FormData()
            form.add_field("image", file, filename=path.name, content_type="application/octet-stream")
            form.add_field("subfolder", subfolder)
            form.add_field("type", "input")
            form.add_field("overwrite", "true")
            answer = await self.request_json("POST", "/upload/image", data=form)
        return upload_answer(answer, f"upload of {path.name} to {self.url}")

    async def queue_prompt(self, prompt: dict, client_id: str) -> str:
        """Queue the workflow; its progress goes to the websocket of `client_id`. Returns the prompt id."""
        try:
            async with self.session.post(self.url + "/prompt", json={"prompt": prompt, "client_id": client_id},
                                         timeout=REQUEST_TIMEOUT) as response:
                body = await response.read()
        except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, aiohttp.ServerDisconnectedError) as error:
            raise self.unreachable(error) from error
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if response.status == 400 and isinstance(answer, dict):
            raise PromptRejected(answer)
        if response.status != 200:
            raise ServerError(f"POST /prompt on {self.url} answered HTTP {response.status}: {body[:300].decode(errors='replace')}")
        return prompt_answer(answer, f"POST /prompt on {self.url}")

    async def history(self, prompt_id: str) -> HistoryEntry | None:
        """The prompt's history entry, which exists once it has finished (successfully or not)."""
        answer = await self.request_json("GET", f"/history/{prompt_id}")
        return history_answer(answer, prompt_id, f"GET /history/{prompt_id} on {self.url}")

    async def queue(self) -> tuple[list[str], list[str]]:
        """Ids of the running and of the pending prompts (every client's)."""
        return queue_answer(await self.request_json("GET", "/queue"), f"GET /queue on {self.url}")

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self.request_json("POST", "/queue", json={"delete": prompt_ids})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt `prompt_id` if it is running. Servers before the targeted interrupt ignore the body and stop
        whatever runs: call this only after checking that `prompt_id` is the running one."""
        await self.request_json("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def download(self, file: OutputFile, destination: Path) -> tuple[int, str]:
        """Fetch one output through /view into `destination`, whole or not at all (a temporary file named
        `.<name>.<random>.part`, renamed into place). Returns its size and sha256."""
        params = {"filename": file.filename, "subfolder": file.subfolder, "type": file.type}
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX, dir=destination.parent)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(handle, "wb") as out:
                try:
                    async with self.session.get(self.url + "/view", params=params, timeout=REQUEST_TIMEOUT) as response:
                        if response.status != 200:
                            raise ServerError(f"GET /view of {file.filename} on {self.url} answered HTTP {response.status}")
                        async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, aiohttp.ServerDisconnectedError) as error:
                    raise self.unreachable(error) from error
            os.replace(temporary, destination)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def websocket(self, client_id: str):
        """The server's event stream for `client_id` (an async context manager yielding the socket)."""
        scheme = {"http": "ws", "https": "wss"}.get(urlsplit(self.url).scheme, "ws")
        url = scheme + self.url[self.url.index(":"):] + f"/ws?clientId={client_id}"
        return self.session.ws_connect(url, heartbeat=WEBSOCKET_HEARTBEAT_S, max_msg_size=0)
