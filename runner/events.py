"""A server's websocket events, for our prompts only: progress lines, and an early signal that a prompt ended.

The websocket is a convenience: whether a prompt has finished is always decided by its /history entry (see
batch.py), so a dropped or refused websocket only costs progress lines and some latency.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from .client import ComfyClient
from .progress import Reporter

RECONNECT_DELAY_S = 2.0


class PromptEvents:
    """What one prompt's events mean to the runner: lines for the reporter, `ended` once the server says the
    prompt is over (success, error or interrupt), and `look` whenever /history is worth asking now (it ended,
    or the websocket dropped and polling takes over)."""

    def __init__(self, item: str, server: str, workflow: dict, reporter: Reporter):
        self.item, self.server, self.workflow, self.reporter = item, server, workflow, reporter
        self.ended = False
        self.look = asyncio.Event()

    def end(self) -> None:
        self.ended = True
        self.look.set()

    def handle(self, kind: str, data: dict) -> None:
        if kind == "execution_start":
            self.reporter.item(self.item, self.server, "started")
        elif kind == "execution_cached" and isinstance(data.get("nodes"), list) and data["nodes"]:
            self.reporter.item(self.item, self.server, f"{len(data['nodes'])} node(s) cached")
        elif kind == "executing":
            if data.get("node") is None:  # the executor's "nothing more to run" for this prompt
                self.end()
            else:
                self.reporter.node(self.item, self.server, self.workflow, str(data["node"]))
        elif kind == "progress" and data.get("node") is not None:
            self.reporter.node(self.item, self.server, self.workflow, str(data["node"]), data.get("value"), data.get("max"))
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self.end()


class EventStream:
    """The websocket of one client id, kept open while a worker runs (reconnecting after a drop), routing the
    events of watched prompts to their PromptEvents. Events of other prompts (other clients', or ours that
    are not watched) are ignored."""

    def __init__(self, client: ComfyClient, client_id: str):
        self.client = client
        self.client_id = client_id
        self.watched: dict[str, PromptEvents] = {}
        self.connected = asyncio.Event()
        self.first_attempt_over = asyncio.Event()  # connected, or refused: no reason to wait for it any longer

    async def run(self) -> None:
        while True:
            try:
                async with self.client.websocket(self.client_id) as socket:
                    self.connected.set()
                    self.first_attempt_over.set()
                    async for message in socket:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self.dispatch(message.data)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                pass  # refused or dropped: /history polling carries on meanwhile
            finally:
                self.first_attempt_over.set()
                if self.connected.is_set():
                    self.connected.clear()
                    for events in self.watched.values():
                        events.look.set()
            await asyncio.sleep(RECONNECT_DELAY_S)

    def dispatch(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        data = event.get("data") if isinstance(event, dict) else None
        # events of another shape than ComfyUI's are not ours to read: ignored, as unknown kinds are
        if isinstance(data, dict) and isinstance(data.get("prompt_id"), str) and data["prompt_id"] in self.watched:
            self.watched[data["prompt_id"]].handle(event.get("type"), data)
