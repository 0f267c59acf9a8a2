"""Running the batch: one worker per server pulls items from a shared queue and, for each, uploads its files,
queues the workflow, follows it to the end, and downloads what it made, keeping the manifest up to date.

Stopping (Ctrl-C / SIGTERM, or a workflow the server refuses): the workers are cancelled; each takes its own
prompt off its server (deleted if still queued; interrupted only when it is the one running, checked first
through /queue) and marks its item cancelled. Other clients' prompts are never touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import aiohttp

from .answers import HistoryEntry, OutputFile, ServerError, output_files
from .client import PARTIAL_SUFFIX, ComfyClient, PromptRejected, ServerUnreachable
from .errors import RunnerError
from .events import EventStream, PromptEvents
from .inputs import TAKES_MULTIVIEW, InputItem
from .manifest import CANCELLED, DONE, ERROR, PENDING, RUNNING, Manifest, now_iso, reset_entry
from .progress import Reporter
from .workflow import InputNode, check_against_object_info, describe, format_prompt_errors, set_input

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 130
UPLOAD_FOLDER = "mv4d_batch"  # in ComfyUI's input folder; one subfolder per distinct item content
FIRST_CONNECT_WAIT_S = 5.0  # wait for the websocket before the first item, so that its progress is seen
POLL_WITHOUT_WEBSOCKET_S = 1.0
POLL_WITH_WEBSOCKET_S = 10.0  # a safety net: the websocket normally says when to look
POLL_AFTER_END_S = 0.2  # the history entry is written just after the last event
QUEUE_CHECK_INTERVAL_S = 10.0  # how often a prompt still without history is looked for in /queue
WITHDRAW_TIMEOUT_S = 15.0  # when stopping, a server that does not answer is not waited for longer
LAST_LOOK_S = 5.0  # past an item's deadline, /history may still take this long to say the prompt finished


class ItemFailed(Exception):
    """The item cannot be made; its message goes into the manifest. The batch goes on."""


class WorkflowRejected(RunnerError):
    """The server's validation refused the workflow before any prompt of the batch was accepted: every item
    would fail the same way, so the batch stops."""


@dataclass
class Batch:
    workflow: dict          # overrides applied
    input_node: InputNode | None  # None: a workflow without inputs, run once
    inputs: dict[str, InputItem]  # by manifest "input"
    manifest: Manifest
    reporter: Reporter
    item_timeout: float | None = None
    any_prompt_accepted: bool = False


def content_tag(files: list[Path]) -> str:
    """8 hex digits of the files' names and contents: the item's upload subfolder, so uploads of different
    items never collide and uploading the same item again rewrites the same files."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as opened:
            for block in iter(lambda: opened.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:8]


# /view's reading of a file name (ComfyUI's server.py and folder_paths.annotated_filepath): a trailing " [output]",
# " [input]" or " [temp]" picks the folder, and only the name's last part counts.
_ANNOTATIONS = (("[output]", "output", 9), ("[input]", "input", 8), ("[temp]", "temp", 7))


def served_file(file: OutputFile) -> tuple[str, list[str], str]:
    """(type, subfolder parts, name) of the file GET /view serves for this output."""
    name, kind = file.filename, file.type
    for suffix, annotated, cut in _ANNOTATIONS:
        if name.endswith(suffix):
            name, kind = name[:-cut], annotated
            break
    return kind, file.subfolder.replace("\\", "/").split("/"), name.replace("\\", "/").rsplit("/", 1)[-1]


def local_path(item_name: str, file: OutputFile) -> PurePosixPath:
    """<item>/<type>/<subfolder>/<name> of the file /view serves: ComfyUI's folders (output/, temp/, input/)
    mirrored, so two outputs share a local file only when they are one file on the server. A part that would
    leave the item's folder, or that no file system takes, fails the item."""
    kind, subfolder, name = served_file(file)
    parts = [kind, *(part for part in subfolder if part not in ("", ".")), name]
    bad = any(part in ("", ".", "..") or any(ord(character) < 32 for character in part) or (len(part) == 2 and part[1] == ":")
              for part in parts)
    if bad:
        raise ItemFailed(f"the server named an output that cannot be saved in the item's folder: "
                         f"{file.type}/{file.subfolder}/{file.filename}"[:300])
    return PurePosixPath(item_name, *parts)


def execution_failure(entry: HistoryEntry, workflow: dict) -> str | None:
    """Why a finished prompt failed, from its history entry; None when it succeeded."""
    for kind, data in entry.messages:
        node_id = str(data.get("node_id"))
        where = describe(node_id, workflow[node_id]) if node_id in workflow else f"node {node_id} ({data.get('node_type')})"
        if kind == "execution_error":
            message = " ".join(str(data.get("exception_message", "")).split())
            return f"{where}: {data.get('exception_type', 'error')}: {message}"
        if kind == "execution_interrupted":
            return f"interrupted on the server at {where} (by another client or the server)"
    if entry.status_str == "error":
        return "the server reported an error without details"
    return None


def server_run_seconds(entry: HistoryEntry) -> float | None:
    """The server's own run time (execution start to end), from its history messages' timestamps."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.messages}
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    if not all(isinstance(stamp, (int, float)) and not isinstance(stamp, bool) for stamp in (start, end)):
        return None
    return (end - start) / 1000 if start and end else None


def remove_partial_downloads(folder: Path) -> None:
    """Downloads a killed runner left half-written (our '.<name>.<random>.part' files) in an item's folder."""
    if folder.is_dir():
        for partial in folder.rglob(f".*{PARTIAL_SUFFIX}"):
            if partial.is_file():
                partial.unlink(missing_ok=True)


async def within(deadline: float | None, timeout: float | None, what: str, awaitable, at_least: float = 0.0):
    """Await `awaitable`, failing the item when the item's deadline (--timeout) passes first (or `at_least`
    seconds from now, when that is later: a last look at a prompt's state is allowed that long)."""
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(at_least, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise ItemFailed(f"timed out after {timeout:g} s {what}") from None


class ServerWorker:
    """Runs items, one at a time, on one server."""

    def __init__(self, batch: Batch, client: ComfyClient):
        self.batch = batch
        self.client = client
        self.events = EventStream(client, uuid.uuid4().hex)
        self.prompt_id: str | None = None  # our prompt on the server, while it may be queued or running

    def save(self) -> None:
        self.batch.manifest.save()

    async def run(self, queue: asyncio.Queue) -> None:
        listener = asyncio.create_task(self.events.run())
        try:
            try:
                await asyncio.wait_for(self.events.first_attempt_over.wait(), FIRST_CONNECT_WAIT_S)
            except asyncio.TimeoutError:
                pass  # no websocket yet: /history polling does without
            while not queue.empty():
                entry = queue.get_nowait()
                try:
                    await self.run_item(entry)
                except ServerUnreachable as error:
                    reset_entry(entry, PENDING)
                    self.save()
                    queue.put_nowait(entry)  # another server may still take it
                    self.batch.reporter.error(f"{error}; no more items go to {self.client.url}")
                    return
        finally:
            listener.cancel()

    async def run_item(self, entry: dict) -> None:
        name, reporter = entry["name"], self.batch.reporter
        try:
            await self.make(entry)
        except asyncio.CancelledError:
            await self.withdraw_after_stop(entry)
            raise
        except WorkflowRejected as rejected:
            entry.update(status=ERROR, error="; ".join(str(rejected).splitlines()))
            self.save()
            raise
        except (ItemFailed, ServerError, aiohttp.ClientError, OSError) as error:
            # server and prompt id stay recorded: they say where to look
            entry.update(status=ERROR, error=str(error) or type(error).__name__, files=[])
            self.save()
            reporter.error(f"{name}: {entry['error']}")
        except RunnerError:
            raise  # the server is gone (ServerUnreachable): the worker puts the item back for another server
        except Exception as error:  # noqa: BLE001 - a bug of ours must fail one item, not the batch
            entry.update(status=ERROR, error=f"internal error of mv4d-batch ({type(error).__name__}: {error}); please report it", files=[])
            self.save()
            reporter.error(f"{name}: {entry['error']}")
        finally:
            self.prompt_id = None

    async def withdraw_after_stop(self, entry: dict) -> None:
        try:
            if self.prompt_id:
                await asyncio.wait_for(self.withdraw(self.prompt_id), WITHDRAW_TIMEOUT_S)
        except (RunnerError, ServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            self.batch.reporter.error(f"{entry['name']}: could not take prompt {self.prompt_id} off {self.client.url} ({error})")
        entry["status"] = CANCELLED
        self.save()

    async def withdraw(self, prompt_id: str) -> str:
        """Take our prompt off the server: deleted while queued, interrupted only if it is the running one
        (servers before the targeted /interrupt would stop whatever runs). Says what was done."""
        running, pending = await self.client.queue()
        if prompt_id in pending:
            await self.client.delete_queued([prompt_id])
            return "deleted from the queue"
        if prompt_id in running:
            await self.client.interrupt(prompt_id)
            return "interrupted"
        return "already finished"

    async def make(self, entry: dict) -> None:
        batch, client = self.batch, self.client
        item = batch.inputs[entry["input"]]
        started = time.monotonic()
        deadline = started + batch.item_timeout if batch.item_timeout else None
        reset_entry(entry, RUNNING)
        entry["server"] = client.url
        self.save()

        item_folder = batch.manifest.path.parent / entry["name"]
        remove_partial_downloads(item_folder)
        workflow = batch.workflow
        if batch.input_node is not None:
            subfolder = f"{UPLOAD_FOLDER}/{content_tag(item.files)}"
            uploaded = [await within(deadline, batch.item_timeout, f"uploading {file.name}", client.upload(file, subfolder))
                        for file in item.files]
            if batch.input_node.takes == TAKES_MULTIVIEW:
                value = uploaded[0].subfolder
            else:
                value = f"{uploaded[0].subfolder}/{uploaded[0].name}" if uploaded[0].subfolder else uploaded[0].name
            workflow = set_input(batch.workflow, batch.input_node, value)
        uploaded_at = time.monotonic()

        try:
            prompt_id = await within(deadline, batch.item_timeout, "queueing the prompt", client.queue_prompt(workflow, self.events.client_id))
        except PromptRejected as rejected:
            lines = format_prompt_errors(rejected.answer, batch.workflow)
            if not batch.any_prompt_accepted:
                raise WorkflowRejected("\n".join([f"{client.url} refused the workflow:", *lines])) from None
            raise ItemFailed("the server refused the prompt: " + "; ".join(lines)) from None
        batch.any_prompt_accepted = True
        queued_at = time.monotonic()
        self.prompt_id = entry["prompt_id"] = prompt_id
        self.save()
        batch.reporter.item(entry["name"], client.label, f"queued as {prompt_id}")

        history = await self.wait_until_finished(entry["name"], prompt_id, deadline)
        self.prompt_id = None
        finished_at = time.monotonic()
        failure = execution_failure(history, batch.workflow)
        if failure:
            raise ItemFailed(failure)

        files, fetched = [], {}  # local path (case-folded, as some file systems compare) -> (path, size, sha256)
        for file in output_files(history.outputs, f"the outputs of prompt {prompt_id} on {client.url}"):
            relative = local_path(entry["name"], file)
            key = relative.as_posix().casefold()
            if key in fetched and fetched[key][0] != relative:
                raise ItemFailed(f"two outputs would be saved as {relative.as_posix()} (their names differ only in case)")
            if key not in fetched:  # two outputs naming one server file (see served_file) share its download
                size, sha256 = await within(deadline, batch.item_timeout, f"downloading {file.filename}",
                                            client.download(file, batch.manifest.path.parent / relative))
                fetched[key] = (relative, size, sha256)
            _, size, sha256 = fetched[key]
            files.append({"path": relative.as_posix(), "filename": file.filename, "subfolder": file.subfolder,
                          "type": file.type, "node_id": file.node_id, "bytes": size, "sha256": sha256})
        done_at = time.monotonic()

        waited = finished_at - queued_at
        run_s = server_run_seconds(history)
        run_s = min(run_s, waited) if run_s is not None else None
        entry.update(status=DONE, files=files, error=None, timings={
            "upload_s": round(uploaded_at - started, 3),
            "queue_s": round(waited - run_s, 3) if run_s is not None else None,
            "run_s": round(run_s if run_s is not None else waited, 3),
            "download_s": round(done_at - finished_at, 3),
            "total_s": round(done_at - started, 3),
        })
        self.save()
        batch.reporter.item(entry["name"], client.label, f"done in {done_at - started:.1f} s, {len(files)} file(s)")

    async def wait_until_finished(self, item: str, prompt_id: str, deadline: float | None) -> HistoryEntry:
        """The prompt's history entry once it exists (the server writes it when the prompt ends). Websocket
        events say when to look; without them, /history is polled every second."""
        events = PromptEvents(item, self.client.label, self.batch.workflow, self.batch.reporter)
        self.events.watched[prompt_id] = events
        last_queue_check = time.monotonic()
        timeout = self.batch.item_timeout
        try:
            while True:
                try:
                    entry = await within(deadline, timeout, f"asking /history about prompt {prompt_id}", self.client.history(prompt_id),
                                         at_least=LAST_LOOK_S)
                    if entry is not None:
                        return entry
                    if deadline is not None and time.monotonic() > deadline:
                        raise ItemFailed(f"timed out after {timeout:g} s")
                    if time.monotonic() - last_queue_check > QUEUE_CHECK_INTERVAL_S:
                        last_queue_check = time.monotonic()
                        await within(deadline, timeout, "asking /queue", self.check_still_there(prompt_id))
                except ItemFailed as failed:
                    if deadline is None or time.monotonic() <= deadline:
                        raise
                    try:
                        what = await asyncio.wait_for(self.withdraw(prompt_id), WITHDRAW_TIMEOUT_S)
                    except (RunnerError, ServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                        what = f"not taken off the server: {error or type(error).__name__}"
                    raise ItemFailed(f"{failed} (prompt {prompt_id} {what})") from None
                if events.ended:
                    await asyncio.sleep(POLL_AFTER_END_S)
                    continue
                events.look.clear()
                wait = POLL_WITH_WEBSOCKET_S if self.events.connected.is_set() else POLL_WITHOUT_WEBSOCKET_S
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                try:
                    await asyncio.wait_for(events.look.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            del self.events.watched[prompt_id]

    async def check_still_there(self, prompt_id: str) -> None:
        """Fail the item when its prompt is neither queued, running nor finished: deleted by another client, or
        the server restarted. (The server writes the history entry before it drops the prompt from the
        running list, hence history is asked again after /queue.)"""
        running, pending = await self.client.queue()
        if prompt_id not in running and prompt_id not in pending and await self.client.history(prompt_id) is None:
            raise ItemFailed(f"prompt {prompt_id} is gone from {self.client.url} (deleted by another client, or the server restarted)")


async def preflight(clients: list[ComfyClient], workflow: dict, input_node: InputNode | None) -> None:
    """Every server answers and has every node type and option the workflow uses; else one error naming all
    problems, before anything is uploaded or queued."""
    answers = await asyncio.gather(*(client.object_info() for client in clients), return_exceptions=True)
    lines = []
    for client, answer in zip(clients, answers):
        prefix = f"{client.url}: " if len(clients) > 1 else ""
        if isinstance(answer, RunnerError):
            lines.append(str(answer))
        elif isinstance(answer, BaseException):
            lines.append(f"{prefix}GET /object_info failed: {answer}")
        else:
            lines.extend(prefix + problem for problem in check_against_object_info(workflow, answer, input_node))
    if lines:
        raise RunnerError("\n".join(lines))


async def run_batch(batch: Batch, entries: list[dict], server_urls: list[str], stop_signal: asyncio.Event) -> int:
    """Run the entries on the servers until all are made, or `stop_signal` is set (Ctrl-C / SIGTERM).
    Returns the exit code; raises RunnerError when pre-flight checks fail or the workflow is refused."""
    async with aiohttp.ClientSession() as session:
        clients = [ComfyClient(url, session) for url in server_urls]
        await preflight(clients, batch.workflow, batch.input_node)
        batch.manifest.data.update(servers=server_urls, started=now_iso(), finished=None)
        batch.manifest.save()
        queue: asyncio.Queue = asyncio.Queue()
        for entry in entries:
            queue.put_nowait(entry)
        workers = [asyncio.create_task(ServerWorker(batch, client).run(queue)) for client in clients]
        stopper = asyncio.create_task(stop_signal.wait())
        remaining = set(workers)
        cancelled, rejected = False, None
        try:
            while remaining and not cancelled and rejected is None:
                finished, remaining = await asyncio.wait(remaining | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                remaining.discard(stopper)
                cancelled = stopper in finished
                rejected = next((task.exception() for task in finished - {stopper}
                                 if isinstance(task.exception(), WorkflowRejected)), None)
            stopper.cancel()
            for task in remaining:
                task.cancel()  # each takes its own prompt off its server, and marks its item cancelled
            results = await asyncio.gather(*workers, return_exceptions=True)
        finally:
            mark_finished(batch.manifest)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, (asyncio.CancelledError, WorkflowRejected)):
                raise result
    if rejected is not None:
        raise rejected
    if cancelled:
        return EXIT_CANCELLED
    if not queue.empty():
        batch.reporter.error(f"{queue.qsize()} item(s) were not run: no server is left")
        return EXIT_FAILED
    return EXIT_FAILED if any(entry["status"] != DONE for entry in entries) else EXIT_OK


def summary(entries: list[dict]) -> str:
    counts = {status: sum(entry["status"] == status for entry in entries) for status in (DONE, ERROR, CANCELLED, PENDING)}
    return ", ".join(f"{count} {status}" for status, count in counts.items() if count) or "nothing to do"


def mark_finished(manifest: Manifest) -> None:
    manifest.data["finished"] = now_iso()
    manifest.save()
