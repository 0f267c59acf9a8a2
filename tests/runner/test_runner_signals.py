"""Ctrl-C and SIGTERM: mv4d-batch run as a command (`python -m mv4d.runner` from a custom_nodes-like folder)
takes only its own prompts off the server, records the items as cancelled and exits 130."""

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from runner_fake_comfyui import FakeComfyUI, image_workflow
from runner_helpers import write_png

ROOT = Path(__file__).resolve().parents[2]


def start_batch(tmp_path: Path, inputs: list[Path], servers: list[str]) -> subprocess.Popen:
    custom_nodes = tmp_path / "custom_nodes"  # as in ComfyUI: the pack is the folder mv4d
    custom_nodes.mkdir()
    (custom_nodes / "mv4d").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "flow.json").write_text(json.dumps(image_workflow()))
    command = [sys.executable, "-m", "mv4d.runner", str(tmp_path / "flow.json"), *map(str, inputs), "--output", str(tmp_path / "out")]
    for server in servers:
        command += ["--server", server]
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(command, cwd=custom_nodes, stderr=stderr, stdout=subprocess.DEVNULL)


def post_foreign_prompt(fake: FakeComfyUI) -> str:
    """Another client's prompt, which the runner must never touch."""
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "theirs"}}}
    request = urllib.request.Request(fake.url + "/prompt", data=json.dumps({"prompt": prompt, "client_id": "someone-else"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["prompt_id"]


def finish(process: subprocess.Popen, tmp_path: Path, signal_number=signal.SIGINT) -> tuple[int, str, dict]:
    process.send_signal(signal_number)
    code = process.wait(timeout=30)
    return code, (tmp_path / "stderr.txt").read_text(), json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_ctrl_c_deletes_our_queued_prompt_interrupts_our_running_one_and_nothing_else(tmp_path):
    inputs = [write_png(tmp_path / "in" / f"{name}.png") for name in ("a", "b", "c")]
    with FakeComfyUI(hold=True) as fake:
        # two addresses of one server: two workers, so one of our prompts runs while the other waits in the queue
        process = start_batch(tmp_path, inputs, [fake.url, fake.url.replace("127.0.0.1", "localhost")])
        try:
            fake.wait_until(lambda: len(fake.received) == 2 and fake.running is not None)
            foreign = post_foreign_prompt(fake)
            ours_running = fake.running[1]
            [ours_queued] = [prompt_id for prompt_id in fake.prompt_ids() if prompt_id not in (ours_running, foreign)]
            code, stderr, manifest = finish(process, tmp_path)
        finally:
            process.kill()
        running, pending = fake.queued_ids()
    assert code == 130, stderr
    assert fake.deleted == [ours_queued]
    assert fake.interrupts == [{"prompt_id": ours_running}]
    assert foreign in running + pending and ours_queued not in pending
    assert sorted((item["status"], item["prompt_id"]) for item in manifest["items"]) == sorted(
        [("cancelled", ours_running), ("cancelled", ours_queued), ("pending", None)])
    assert manifest["finished"] and "mv4d-batch: stopping" in stderr and "cancelled: 2 cancelled, 1 pending" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_while_another_clients_prompt_runs_never_interrupts_it(tmp_path, signal_number):
    inputs = [write_png(tmp_path / "in" / "a.png")]
    with FakeComfyUI(hold=True) as fake:
        foreign = post_foreign_prompt(fake)
        fake.wait_until(lambda: fake.running is not None)
        process = start_batch(tmp_path, inputs, [fake.url])
        try:
            fake.wait_until(lambda: len(fake.received) == 2)
            [ours] = [prompt_id for prompt_id in fake.prompt_ids() if prompt_id != foreign]
            code, stderr, manifest = finish(process, tmp_path, signal_number)
        finally:
            process.kill()
        running, pending = fake.queued_ids()
    assert code == 130, stderr
    assert fake.deleted == [ours] and fake.interrupts == []
    assert running == [foreign] and pending == []
    assert [(item["status"], item["prompt_id"]) for item in manifest["items"]] == [("cancelled", ours)]
