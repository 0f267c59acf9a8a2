"""Progress lines from websocket events: only our prompts, thinned per item, and the end of a prompt noticed."""

import io
import json

from runner_fake_comfyui import image_workflow

from mv4d.runner.events import EventStream, PromptEvents
from mv4d.runner.progress import Reporter


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_is_at_most_a_line_a_second_per_item_unless_the_node_changes():
    clock, stream = Clock(), io.StringIO()
    reporter = Reporter(stream=stream, clock=clock)
    workflow = image_workflow()
    for step in range(1, 6):  # 5 steps within 0.4 s: one line
        reporter.node("a", "host:1", workflow, "3", step, 20)
        clock.now += 0.1
    reporter.node("b", "host:2", workflow, "3", 1, 20)  # another item has its own budget
    reporter.node("a", "host:1", workflow, "4")  # a new node always prints
    clock.now += 1.0
    reporter.node("a", "host:1", workflow, "4", 7, 9)
    reporter.node("a", "host:1", workflow, "12:5", 1, 2)  # a node expanded from a subgraph: not in the workflow
    assert stream.getvalue().splitlines() == [
        "[a @ host:1] node 3 'Scale' (ImageScale) 1/20",
        "[b @ host:2] node 3 'Scale' (ImageScale) 1/20",
        "[a @ host:1] node 4 'Save' (SaveImage)",
        "[a @ host:1] node 4 'Save' (SaveImage) 7/9",
        "[a @ host:1] node 12:5 1/2",
    ]


def test_quiet_prints_errors_only():
    stream = io.StringIO()
    reporter = Reporter(quiet=True, stream=stream)
    reporter.item("a", "host:1", "started")
    reporter.node("a", "host:1", image_workflow(), "3", 1, 2)
    reporter.error("a: it broke")
    assert stream.getvalue() == "mv4d-batch: a: it broke\n"


def test_only_events_of_watched_prompts_are_acted_on():
    stream = io.StringIO()
    events = PromptEvents("a", "host:1", image_workflow(), Reporter(stream=stream))
    listener = EventStream(client=None, client_id="me")
    listener.watched["ours"] = events
    for kind, data in [("executing", {"node": None, "prompt_id": "theirs"}), ("execution_success", {"prompt_id": "theirs"}),
                       ("progress", {"value": 1, "max": 2, "node": "3", "prompt_id": "theirs"}), ("status", {"status": {}}),
                       ("executing", {"node": "3"})]:
        listener.dispatch(json.dumps({"type": kind, "data": data}))
    listener.dispatch("not json")
    assert not events.ended and stream.getvalue() == ""
    listener.dispatch(json.dumps({"type": "execution_start", "data": {"prompt_id": "ours"}}))
    listener.dispatch(json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "node": "3", "prompt_id": "ours"}}))
    assert not events.ended
    listener.dispatch(json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "ours"}}))
    assert events.ended and events.look.is_set()
    assert stream.getvalue().splitlines() == ["[a @ host:1] started", "[a @ host:1] node 3 'Scale' (ImageScale) 1/2"]
