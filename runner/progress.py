"""Concise progress lines on stderr, from the server's websocket events for our prompts."""

from __future__ import annotations

import sys
import time

from .workflow import describe

MIN_SECONDS_BETWEEN_LINES = 1.0  # per item, unless the running node changes


class Reporter:
    """Prints `[item @ server] text` lines. Progress of one node is thinned to about a line a second per item;
    a new node, a finished item and errors always print. quiet: errors only (no progress, no summary)."""

    def __init__(self, quiet: bool = False, stream=None, clock=time.monotonic):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.clock = clock
        self.last_line: dict[str, tuple[float, str | None]] = {}  # item -> (when, node id)

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def error(self, text: str) -> None:
        self.write(f"mv4d-batch: {text}")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.write(f"mv4d-batch: {text}")

    def item(self, item: str, server: str, text: str) -> None:
        if not self.quiet:
            self.write(f"[{item} @ {server}] {text}")

    def node(self, item: str, server: str, workflow: dict, node_id: str, value: int | None = None, maximum: int | None = None) -> None:
        now = self.clock()
        when, last_node = self.last_line.get(item, (float("-inf"), None))
        if node_id == last_node and now - when < MIN_SECONDS_BETWEEN_LINES:
            return
        self.last_line[item] = (now, node_id)
        label = describe(node_id, workflow[node_id]) if node_id in workflow else f"node {node_id}"
        self.item(item, server, label + (f" {value}/{maximum}" if maximum else ""))
