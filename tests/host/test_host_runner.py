"""mv4d-batch against a real ComfyUI server: a batch, resume, Ctrl-C, pre-flight errors and a failing item.

The runner runs in this process through main(argv), and as `python -m mv4d.runner` from the server's
custom_nodes folder where a signal is sent.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mv4d_host_helpers import (WORKFLOWS, get_json, load_api_workflow, on_tiny_models, post_prompt, view, wait_for_history,
                               write_input_video, write_input_views)

from mv4d.runner.cli import main
from mv4d.runner.local_server import free_port


@pytest.fixture
def host_conftest(request):
    """tests/host/conftest.py as a module, found by its path (`import conftest` may give another lane's)."""
    return request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))


def invert_workflow(prefix: str) -> dict:
    """Core nodes only: LoadImage -> ImageScale to a PrimitiveInt titled size -> ImageInvert -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "mv4d_input.png"}, "_meta": {"title": "Load Image"}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 64}, "_meta": {"title": "size"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": ["2", 0],
                                                     "height": ["2", 0], "crop": "disabled"}, "_meta": {"title": "Scale"}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}, "_meta": {"title": "Invert"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": f"mv4d_runner/{prefix}"}, "_meta": {"title": "Save"}},
    }


def endless_fit(prefix: str) -> dict:
    """The shipped 4D example with a fit far longer than any test: it ends only by an interrupt."""
    prompt = load_api_workflow("4d_gaussians_example.json")
    prompt = {key: node for key, node in prompt.items() if key in ("1", "2", "3", "5")}
    prompt["3"]["inputs"]["iterations"] = 200000
    prompt["5"]["inputs"]["filename_prefix"] = f"mv4d_runner/{prefix}"
    return prompt


def solid_images(folder: Path, colors: dict[str, tuple[int, int, int]]) -> list[Path]:
    from PIL import Image  # a ComfyUI requirement

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, color in colors.items():
        Image.new("RGB", (64, 64), color).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def write_workflow(path: Path, workflow: dict) -> Path:
    path.write_text(json.dumps(workflow))
    return path


def run(capsys, *argv) -> tuple[int, str, dict | None]:
    argv = [str(arg) for arg in argv]
    code = main(argv)
    stderr = capsys.readouterr().err
    manifest = Path(argv[argv.index("--output") + 1]) / "manifest.json"
    return code, stderr, json.loads(manifest.read_text()) if manifest.exists() else None


def history_ids(server) -> set[str]:
    return set(get_json(server.url + "/history"))


def queue_ids(server) -> tuple[list[str], list[str]]:
    queue = get_json(server.url + "/queue")
    return [entry[1] for entry in queue["queue_running"]], [entry[1] for entry in queue["queue_pending"]]


def wait_until(condition, timeout: float = 120, what: str = "the expected state") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never reached {what}")
        time.sleep(0.1)


def test_a_batch_of_images_runs_and_every_output_is_downloaded(comfy_server, tmp_path, capsys):
    from PIL import Image

    colors = {"red": (200, 30, 40), "green": (20, 180, 60), "blue": (10, 40, 220)}
    images = solid_images(tmp_path / "in", colors)
    workflow = write_workflow(tmp_path / "flow.json", invert_workflow("batch"))
    code, stderr, manifest = run(capsys, workflow, tmp_path / "in", "--output", tmp_path / "out", "--server", comfy_server.url, "--size", "32")
    assert code == 0, stderr + comfy_server.log_tail()
    assert manifest["overrides"] == {"size": 32} and manifest["servers"] == [comfy_server.url]
    assert [(item["input"], item["status"]) for item in manifest["items"]] == [(str(path), "done") for path in sorted(images)]
    for item in manifest["items"]:
        entry = get_json(f"{comfy_server.url}/history/{item['prompt_id']}")[item["prompt_id"]]
        assert entry["status"]["status_str"] == "success"
        loaded = entry["prompt"][2]["1"]["inputs"]["image"]
        assert loaded.startswith("mv4d_batch/") and (comfy_server.input_dir / loaded).read_bytes() == Path(item["input"]).read_bytes()
        assert entry["prompt"][2]["2"]["inputs"]["value"] == 32
        [saved] = entry["outputs"]["5"]["images"]
        [file] = item["files"]
        assert (file["filename"], file["subfolder"], file["type"], file["node_id"]) == (saved["filename"], saved["subfolder"], "output", "5")
        data = (tmp_path / "out" / file["path"]).read_bytes()
        assert data == view(comfy_server.url, saved) == (comfy_server.output_dir / saved["subfolder"] / saved["filename"]).read_bytes()
        assert file["bytes"] == len(data) and file["path"] == f"{item['name']}/output/mv4d_runner/{saved['filename']}"
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        red, green, blue = colors[item["name"]]
        assert picture.size == (32, 32)
        inverted = (255 - red, 255 - green, 255 - blue)  # up to float rounding in ComfyUI's [0, 1] images
        assert all(abs(got - want) <= 1 for got, want in zip(picture.getpixel((5, 7)), inverted)), picture.getpixel((5, 7))
    assert "'Invert' (ImageInvert)" in stderr or "done in" in stderr


def test_a_resumed_batch_runs_only_what_is_new(comfy_server, tmp_path, capsys):
    solid_images(tmp_path / "in", {"one": (1, 2, 3), "two": (4, 5, 6)})
    workflow = write_workflow(tmp_path / "flow.json", invert_workflow("resume"))
    argv = [workflow, tmp_path / "in", "--output", tmp_path / "out", "--server", comfy_server.url]
    code, _, first = run(capsys, *argv)
    assert code == 0
    before = history_ids(comfy_server)
    solid_images(tmp_path / "in", {"three": (7, 8, 9)})  # a third input arrives later
    code, stderr, second = run(capsys, *argv)
    assert code == 0 and "2 item(s) already done" in stderr
    assert [item["prompt_id"] for item in second["items"][:2]] == [item["prompt_id"] for item in first["items"]]
    assert history_ids(comfy_server) - before == {second["items"][2]["prompt_id"]}
    assert [item["name"] for item in second["items"]] == ["one", "two", "three"]


def test_ctrl_c_while_our_prompt_waits_behind_another_clients_then_resume(comfy_server, tmp_path, capsys):
    solid_images(tmp_path / "in", {"first": (50, 60, 70)})
    workflow = write_workflow(tmp_path / "flow.json", invert_workflow("cancel"))
    argv = [workflow, tmp_path / "in", "--output", tmp_path / "out", "--server", comfy_server.url]
    code, _, done_before = run(capsys, *argv)  # the first item is done before the interrupted run
    assert code == 0
    status, answer = post_prompt(comfy_server.url, endless_fit("blocker"), client_id="someone-else")
    assert status == 200, answer
    blocker = answer["prompt_id"]
    wait_until(lambda: queue_ids(comfy_server)[0] == [blocker], what="the other client's prompt running")
    solid_images(tmp_path / "in", {"second": (80, 90, 100), "third": (110, 120, 130)})

    with open(tmp_path / "stderr.txt", "wb") as stderr:  # `cd custom_nodes && python -m mv4d.runner ...`
        process = subprocess.Popen([sys.executable, "-m", "mv4d.runner", *map(str, argv)], cwd=comfy_server.base / "custom_nodes", stderr=stderr)
    try:
        def second_item_queued():
            manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
            prompt_id = manifest["items"][1]["prompt_id"] if len(manifest["items"]) > 2 else None
            return prompt_id is not None and prompt_id in queue_ids(comfy_server)[1]

        wait_until(second_item_queued, what="our second item waiting in the queue")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, (tmp_path / "stderr.txt").read_text()
    finally:
        process.kill()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    first, second, third = manifest["items"]
    assert (first["status"], first["prompt_id"]) == ("done", done_before["items"][0]["prompt_id"])
    assert second["status"] == "cancelled" and third["status"] == "pending"
    running, pending = queue_ids(comfy_server)
    assert running == [blocker] and second["prompt_id"] not in pending  # ours deleted, theirs untouched
    assert second["prompt_id"] not in history_ids(comfy_server)

    urllib_post(comfy_server.url + "/interrupt", {"prompt_id": blocker})
    wait_for_history(comfy_server.url, blocker, timeout=120)
    before = history_ids(comfy_server)
    code, stderr, resumed = run(capsys, *argv)
    assert code == 0, stderr
    assert [item["status"] for item in resumed["items"]] == ["done"] * 3
    assert resumed["items"][0]["prompt_id"] == first["prompt_id"]  # not run again
    assert history_ids(comfy_server) - before == {resumed["items"][1]["prompt_id"], resumed["items"][2]["prompt_id"]}


def test_ctrl_c_while_our_prompt_runs_interrupts_it(comfy_server, tmp_path):
    workflow = endless_fit("ours")
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "mv4d_input.png"}}
    workflow["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "mv4d_runner/ours"}}
    solid_images(tmp_path / "in", {"long": (1, 1, 1)})
    argv = [write_workflow(tmp_path / "flow.json", workflow), tmp_path / "in", "--output", tmp_path / "out", "--server", comfy_server.url]
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mv4d.runner", *map(str, argv)], cwd=comfy_server.base / "custom_nodes", stderr=stderr)
    try:
        def running_prompt():
            manifest = json.loads((tmp_path / "out" / "manifest.json").read_text()) if (tmp_path / "out" / "manifest.json").exists() else None
            prompt_id = manifest and manifest["items"][0]["prompt_id"]
            return prompt_id if prompt_id and prompt_id in queue_ids(comfy_server)[0] else None

        wait_until(running_prompt, what="our prompt running")
        prompt_id = running_prompt()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130, (tmp_path / "stderr.txt").read_text()
    finally:
        process.kill()
    entry = wait_for_history(comfy_server.url, prompt_id, timeout=120)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    [item] = json.loads((tmp_path / "out" / "manifest.json").read_text())["items"]
    assert (item["status"], item["prompt_id"]) == ("cancelled", prompt_id)


def test_an_unreachable_server_is_a_clear_error(tmp_path, capsys, comfy_server):
    solid_images(tmp_path / "in", {"a": (1, 2, 3)})
    port = free_port()  # nothing listens there
    code, stderr, manifest = run(capsys, write_workflow(tmp_path / "flow.json", invert_workflow("x")), tmp_path / "in",
                                 "--output", tmp_path / "out", "--server", f"http://127.0.0.1:{port}")
    assert code == 2 and manifest is None
    assert stderr.startswith(f"mv4d-batch: cannot reach ComfyUI at http://127.0.0.1:{port} (") and "--start-server" in stderr


@pytest.mark.parametrize("change, expected", [
    ({"6": {"class_type": "NoSuchNode", "inputs": {"image": ["4", 0]}}},
     "the workflow uses node types this server does not have: NoSuchNode (node 6)"),
    ({"6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing_model.safetensors"}}},
     "node 6 (CheckpointLoaderSimple) input 'ckpt_name': model file 'missing_model.safetensors' not found in models/checkpoints"),
], ids=["unknown node", "missing model"])
def test_a_workflow_the_server_cannot_run_is_refused_before_anything_is_queued(comfy_server, tmp_path, capsys, change, expected):
    solid_images(tmp_path / "in", {"a": (9, 9, 9)})
    workflow = {**invert_workflow("refused"), **change}
    history_before, queue_before = history_ids(comfy_server), queue_ids(comfy_server)
    code, stderr, manifest = run(capsys, write_workflow(tmp_path / "flow.json", workflow), tmp_path / "in",
                                 "--output", tmp_path / "out", "--server", comfy_server.url)
    assert code == 2 and manifest is None
    assert f"mv4d-batch: {expected}" in stderr
    assert history_ids(comfy_server) == history_before and queue_ids(comfy_server) == queue_before
    assert not (comfy_server.input_dir / "mv4d_batch").exists() or not any(
        path.name == "a.png" and path.read_bytes() == (tmp_path / "in" / "a.png").read_bytes()
        for path in (comfy_server.input_dir / "mv4d_batch").rglob("a.png"))


def test_unreadable_and_failing_inputs_are_recorded_while_the_batch_goes_on(comfy_server, tmp_path, capsys):
    solid_images(tmp_path / "in", {"a_good": (10, 20, 30), "d_good": (40, 50, 60)})
    (tmp_path / "in" / "b_text.png").write_text("not a picture at all")
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (70, 80, 90)).save(png, format="PNG")
    (tmp_path / "in" / "c_truncated.png").write_bytes(png.getvalue()[:40])  # a PNG header, then nothing decodable
    before = history_ids(comfy_server)
    code, stderr, manifest = run(capsys, write_workflow(tmp_path / "flow.json", invert_workflow("mixed")), tmp_path / "in",
                                 "--output", tmp_path / "out", "--server", comfy_server.url)
    assert code == 1
    items = {item["name"]: item for item in manifest["items"]}
    assert items["a_good"]["status"] == items["d_good"]["status"] == "done"
    text = items["b_text"]
    assert text["status"] == "error" and text["prompt_id"] is None and text["error"].startswith(f"{tmp_path / 'in' / 'b_text.png'}: not an image")
    truncated = items["c_truncated"]
    assert truncated["status"] == "error" and truncated["error"].startswith("node 1 'Load Image' (LoadImage): ")
    entry = get_json(f"{comfy_server.url}/history/{truncated['prompt_id']}")[truncated["prompt_id"]]
    [error] = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert " ".join(error["exception_message"].split()) in truncated["error"]
    assert history_ids(comfy_server) - before == {items[name]["prompt_id"] for name in ("a_good", "c_truncated", "d_good")}
    assert f"mv4d-batch: {tmp_path / 'in' / 'b_text.png'}: not an image" in stderr
    assert "mv4d-batch: c_truncated: node 1 'Load Image' (LoadImage)" in stderr


def test_the_shipped_multiview_and_video_workflows_run_as_batches(comfy_server, host_conftest, tmp_path, capsys):
    for name in ("set_a", "set_b"):
        write_input_views(tmp_path / "sets" / name)
    workflow = write_workflow(tmp_path / "multiview.json", on_tiny_models(load_api_workflow("multiview_to_4d.json")))
    code, stderr, manifest = run(capsys, workflow, tmp_path / "sets" / "set_a", tmp_path / "sets" / "set_b",
                                 "--output", tmp_path / "out_multiview", "--server", comfy_server.url, "--steps", "2")
    assert code == 0, stderr
    for item in manifest["items"]:
        entry = get_json(f"{comfy_server.url}/history/{item['prompt_id']}")[item["prompt_id"]]
        folder = entry["prompt"][2]["3"]["inputs"]["folder"]
        assert sorted(path.name for path in (comfy_server.input_dir / folder).iterdir()) == [f"view_{view:02d}.png" for view in range(4)]
        assert entry["prompt"][2]["101"]["inputs"]["value"] == 2  # --steps went into the primitive titled steps
        suffixes = {Path(file["filename"]).suffix for file in item["files"]}
        assert {".webp", ".splatv", ".ply", ".safetensors"} <= suffixes
        assert all((tmp_path / "out_multiview" / file["path"]).stat().st_size == file["bytes"] for file in item["files"])

    write_input_video(tmp_path / "clip.mp4")
    workflow = write_workflow(tmp_path / "video.json", on_tiny_models(load_api_workflow("video_to_4d.json")))
    code, stderr, manifest = run(capsys, workflow, tmp_path / "clip.mp4", "--output", tmp_path / "out_video", "--server", comfy_server.url)
    assert code == 0, stderr
    [item] = manifest["items"]
    entry = get_json(f"{comfy_server.url}/history/{item['prompt_id']}")[item["prompt_id"]]
    assert (comfy_server.input_dir / entry["prompt"][2]["3"]["inputs"]["file"]).read_bytes() == (tmp_path / "clip.mp4").read_bytes()
    assert item["files"]


def test_the_example_workflow_without_inputs_runs_once_through_the_runner(comfy_server, tmp_path, capsys):
    """Issue 12, item 5: 4d_gaussians_example has no input node, and the runner refused it."""
    code, stderr, manifest = run(capsys, WORKFLOWS / "api" / "4d_gaussians_example.json", "--output", tmp_path / "out",
                                 "--server", comfy_server.url, "--set", "3.iterations=20")
    assert code == 0, stderr
    [item] = manifest["items"]
    assert item["name"] == "4d_gaussians_example" and item["status"] == "done"
    paths = [file["path"] for file in item["files"]]
    assert any(path.startswith("4d_gaussians_example/output/mv4d/example_") and path.endswith(".splatv") for path in paths)
    assert any(path.startswith("4d_gaussians_example/temp/") for path in paths)  # the turntable preview
    assert all((tmp_path / "out" / file["path"]).stat().st_size == file["bytes"] for file in item["files"])


def test_start_server_runs_the_batch_on_a_comfyui_of_its_own(comfy_server, host_conftest, tmp_path, capsys):
    base = tmp_path / "own"
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir(parents=True)
    comfyui_args = (f"--cpu --input-directory {base / 'input'} --output-directory {base / 'output'} --temp-directory {base / 'temp'} "
                    f"--user-directory {base / 'user'} --database-url sqlite:///:memory: --disable-all-custom-nodes")
    solid_images(tmp_path / "in", {"own": (33, 66, 99)})
    code, stderr, manifest = run(capsys, write_workflow(tmp_path / "flow.json", invert_workflow("own")), tmp_path / "in",
                                 "--output", tmp_path / "out", "--start-server", "--comfyui-dir", host_conftest.HOST, "--comfyui-args", comfyui_args)
    assert code == 0, stderr
    [url] = manifest["servers"]
    assert url != comfy_server.url and manifest["items"][0]["server"] == url
    [file] = manifest["items"][0]["files"]
    assert (tmp_path / "out" / file["path"]).read_bytes() == (base / "output" / file["subfolder"] / file["filename"]).read_bytes()
    with pytest.raises(OSError):  # it was stopped at the end
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()


def urllib_post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass

