"""mv4d-batch end to end against a fake ComfyUI server, in process through main(argv)."""

import hashlib
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

from runner_fake_comfyui import FakeComfyUI, image_workflow
from runner_helpers import write_png

from mv4d.runner.cli import main
from mv4d.runner.local_server import free_port

HERE = Path(__file__).resolve().parent


def inputs(folder: Path, *names: str, payloads: dict | None = None) -> list[Path]:
    return [write_png(folder / f"{name}.png", (payloads or {}).get(name, b"")) for name in names]


def test_a_batch_runs_every_item_and_downloads_every_output(fake, workflow_file, run_cli, tmp_path):
    images = inputs(tmp_path / "in", "a", "b", "c")
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url, "--size", "32")
    assert code == 0, stderr
    assert manifest["overrides"] == {"size": 32} and manifest["servers"] == [fake.url]
    assert manifest["workflow"] == str(workflow_file) and manifest["started"] and manifest["finished"]
    assert manifest["workflow_sha256"] == hashlib.sha256(json.dumps(image_workflow(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    items = manifest["items"]
    assert [(item["input"], item["name"], item["status"], item["error"]) for item in items] == [
        (str(image), image.stem, "done", None) for image in images]
    assert [item["prompt_id"] for item in items] == fake.prompt_ids()
    for item, image, sent in zip(items, images, fake.received):
        # the input went up into its own content-named folder, and the prompt loads it from there at size 32
        [uploaded] = [key for key in fake.uploads if key.endswith("/" + image.name)]
        assert fake.uploads[uploaded] == image.read_bytes() and uploaded.startswith("mv4d_batch/") and len(uploaded.split("/")[1]) == 8
        assert sent["prompt"]["1"]["inputs"]["image"] == uploaded and sent["prompt"]["2"]["inputs"]["value"] == 32
        # every file of every output key (images, files, nested groups, temp previews) downloaded as /view serves it
        assert len(item["files"]) == 4 and {file["node_id"] for file in item["files"]} == {"4", "5"}
        for file in item["files"]:
            content = fake.files[(file["type"], file["subfolder"], file["filename"])]
            local = tmp_path / "out" / file["path"]
            assert file["path"] == "/".join(part for part in (item["name"], file["type"], file["subfolder"], file["filename"]) if part)
            assert local.read_bytes() == content and file["bytes"] == len(content)
            assert file["sha256"] == hashlib.sha256(content).hexdigest()
        assert set(item["timings"]) == {"upload_s", "queue_s", "run_s", "download_s", "total_s"}
        assert all(value >= 0 for value in item["timings"].values())
    assert "[a @ 127.0.0.1:" in stderr and "'Scale' (ImageScale)" in stderr and "3 done" in stderr
    assert not list((tmp_path / "out").rglob("*.part"))


def test_an_unreachable_server_is_a_clear_error_before_anything(workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a")
    port = free_port()  # nothing listens there: connection refused
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", f"http://127.0.0.1:{port}")
    assert code == 2 and manifest is None
    assert f"mv4d-batch: cannot reach ComfyUI at http://127.0.0.1:{port} (" in stderr
    assert "is it running? start it, or pass --start-server with COMFYUI_DIR" in stderr and "Traceback" not in stderr


def test_a_workflow_with_an_unknown_node_is_refused_before_anything_is_uploaded(fake, run_cli, tmp_path):
    workflow = image_workflow()
    workflow["6"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["1", 0]}}
    (tmp_path / "flow.json").write_text(json.dumps(workflow))
    inputs(tmp_path / "in", "a", "b")
    code, stderr, manifest = run_cli(tmp_path / "flow.json", tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 2 and manifest is None
    assert "mv4d-batch: the workflow uses node types this server does not have: FancyUpscaler (node 6)" in stderr
    assert fake.uploads == {} and fake.received == []


def test_a_missing_model_file_names_node_input_and_folder(fake, run_cli, tmp_path):
    workflow = image_workflow()
    workflow["6"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}
    (tmp_path / "flow.json").write_text(json.dumps(workflow))
    inputs(tmp_path / "in", "a")
    code, stderr, _ = run_cli(tmp_path / "flow.json", tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 2 and fake.received == []
    assert ("node 6 (CheckpointLoaderSimple) input 'ckpt_name': model file 'sdxl.safetensors' not found in models/checkpoints"
            in stderr)


def test_an_input_that_is_not_an_image_is_recorded_and_the_rest_runs(fake, workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "c")
    (tmp_path / "in" / "b.png").write_text("just text, renamed")
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 1
    by_name = {item["name"]: item for item in manifest["items"]}
    assert by_name["a"]["status"] == by_name["c"]["status"] == "done"
    assert by_name["b"]["status"] == "error" and by_name["b"]["prompt_id"] is None
    assert by_name["b"]["error"].startswith(f"{tmp_path / 'in' / 'b.png'}: not an image")
    assert f"mv4d-batch: {tmp_path / 'in' / 'b.png'}: not an image" in stderr
    assert not any(key.endswith("/b.png") for key in fake.uploads) and len(fake.received) == 2


def test_when_no_input_is_usable_nothing_runs(fake, workflow_file, run_cli, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.png").write_text("text")
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in" / "b.png", tmp_path / "in" / "missing.png",
                                     "--output", tmp_path / "out", "--server", fake.url)
    assert code == 2 and manifest is None and fake.uploads == {}
    assert "no such file or folder" in stderr and "no input can be used" in stderr


def test_a_server_side_error_on_one_item_is_recorded_and_the_batch_goes_on(fake, workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "b", "c", payloads={"b": b"FAIL"})
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url, "--quiet")
    assert code == 1
    a, b, c = manifest["items"]
    assert a["status"] == c["status"] == "done" and b["status"] == "error"
    assert b["error"] == "node 1 'Load Image' (LoadImage): PIL.UnidentifiedImageError: cannot identify image file"
    assert b["prompt_id"] == fake.prompt_ids()[1] and b["server"] == fake.url and b["files"] == []
    assert stderr.splitlines() == [f"mv4d-batch: b: {b['error']}"]  # --quiet: errors only


def test_a_workflow_refused_on_the_first_prompt_stops_the_batch(fake, workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "b", payloads={"a": b"REJECT"})
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 2 and fake.received == []
    assert f"mv4d-batch: {fake.url} refused the workflow:" in stderr
    assert "mv4d-batch: node 1 'Load Image' (LoadImage) input 'image': Custom validation failed for node (image - Invalid image file" in stderr
    assert [item["status"] for item in manifest["items"]] == ["error", "pending"]


def test_a_prompt_refused_after_others_were_accepted_fails_only_its_item(fake, workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "b", "c", payloads={"b": b"REJECT"})
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 1 and len(fake.received) == 2
    assert [item["status"] for item in manifest["items"]] == ["done", "error", "done"]
    assert manifest["items"][1]["error"].startswith("the server refused the prompt: node 1 'Load Image' (LoadImage) input 'image'")


def test_resume_skips_done_items_and_redoes_the_rest(fake, workflow_file, run_cli, tmp_path):
    images = inputs(tmp_path / "in", "a", "b", "c", payloads={"b": b"FAIL"})
    argv = [workflow_file, *images, "--output", tmp_path / "out", "--server", fake.url, "--seed", "3", "--set", "4.filename_prefix=x"]
    workflow = image_workflow()
    workflow["6"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 2, "sampler_name": "euler", "scheduler": "karras"}}
    workflow_file.write_text(json.dumps(workflow))
    code, _, first = run_cli(*argv)
    assert code == 1 and len(fake.received) == 3
    assert fake.received[0]["prompt"]["6"]["inputs"]["seed"] == 3 and fake.received[0]["prompt"]["4"]["inputs"]["filename_prefix"] == "x"

    # b failed: only b is redone (and fails again); a and c keep their prompts
    code, stderr, second = run_cli(*argv)
    assert code == 1 and len(fake.received) == 4 and "2 item(s) already done" in stderr
    assert [item["prompt_id"] for item in second["items"]] == [first["items"][0]["prompt_id"], fake.prompt_ids()[3],
                                                              first["items"][2]["prompt_id"]]

    # a file of c went missing: c is redone, a is not
    (tmp_path / "out" / second["items"][2]["files"][0]["path"]).unlink()
    (tmp_path / "in" / "b.png").unlink()  # and b is gone: recorded as an error, never uploaded
    code, stderr, third = run_cli(*argv)
    assert code == 1 and len(fake.received) == 5 and fake.received[4]["prompt"]["1"]["inputs"]["image"].endswith("/c.png")
    assert [item["status"] for item in third["items"]] == ["done", "error", "done"]
    assert "no such file or folder" in third["items"][1]["error"]
    assert all((tmp_path / "out" / file["path"]).is_file() for file in third["items"][2]["files"])

    # other overrides would mix two batches in one folder: refused, unless --restart
    code, stderr, _ = run_cli(*argv[:-4], "--seed", "4")
    assert code == 2 and "holds a batch made with another overrides" in stderr and len(fake.received) == 5
    code, _, restarted = run_cli(*argv[:-4], "--seed", "4", "--restart")
    assert code == 1 and len(fake.received) == 7 and restarted["overrides"] == {"seed": 4}
    assert [(item["name"], item["status"]) for item in restarted["items"]] == [("a", "done"), ("b", "error"), ("c", "done")]


def test_without_a_websocket_the_batch_still_finishes_by_polling(workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "b")
    with FakeComfyUI(websocket=False) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 0 and [item["status"] for item in manifest["items"]] == ["done", "done"]
    assert "(ImageScale)" not in stderr  # no websocket, no node progress


def test_several_servers_share_the_items(workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a", "b", "c", "d")
    with FakeComfyUI() as first, FakeComfyUI() as second:
        code, _, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", first.url, "--server", second.url)
    assert code == 0 and manifest["servers"] == [first.url, second.url]
    assert first.received and second.received and len(first.received) + len(second.received) == 4
    for item in manifest["items"]:
        server = first if item["server"] == first.url else second
        assert item["prompt_id"] in server.prompt_ids()


def test_an_item_over_its_timeout_is_interrupted_and_recorded(workflow_file, run_cli, tmp_path):
    inputs(tmp_path / "in", "a")
    with FakeComfyUI(hold=True) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url, "--timeout", "0.5")
    [item] = manifest["items"]
    assert code == 1 and item["status"] == "error"
    assert item["error"] == f"timed out after 0.5 s (prompt {item['prompt_id']} interrupted)"
    assert fake.interrupts == [{"prompt_id": item["prompt_id"]}]


def test_a_multiview_folder_is_uploaded_into_one_folder_the_node_loads(fake, run_cli, tmp_path):
    workflow = image_workflow()
    workflow["1"] = {"class_type": "MV4D_LoadMultiviewImages", "inputs": {"folder": "", "size": 64, "input_view": "first"}}
    (tmp_path / "flow.json").write_text(json.dumps(workflow))
    for index in range(3):
        write_png(tmp_path / "sets" / "chair" / f"view_{index}.png")
    write_png(tmp_path / "sets" / "lamp" / "view_0.png")  # one view only: not a multi-view set
    code, stderr, manifest = run_cli(tmp_path / "flow.json", tmp_path / "sets" / "chair", tmp_path / "sets" / "lamp",
                                     "--output", tmp_path / "out", "--server", fake.url)
    assert code == 1
    chair, lamp = manifest["items"]
    assert chair["status"] == "done" and lamp["status"] == "error" and "at least 2 images" in lamp["error"]
    [sent] = fake.received
    folder = sent["prompt"]["1"]["inputs"]["folder"]
    assert sorted(fake.uploads) == [f"{folder}/view_{index}.png" for index in range(3)]


def test_a_server_lost_mid_batch_leaves_its_item_pending(workflow_file, tmp_path, capsys):
    inputs(tmp_path / "in", "a")
    fake = FakeComfyUI(hold=True).__enter__()
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=main(
        [str(workflow_file), str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--server", fake.url])))
    runner.start()
    fake.wait_until(lambda: fake.running is not None)
    fake.__exit__(None, None, None)  # the server goes away while our prompt runs
    runner.join(30)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result["code"] == 1 and manifest["items"][0]["status"] == "pending"
    stderr = capsys.readouterr().err
    assert f"cannot reach ComfyUI at {fake.url}" in stderr and "1 item(s) were not run: no server is left" in stderr


FAKE_MAIN = """
import sys
sys.path.insert(0, {here!r})
from runner_fake_comfyui import FakeComfyUI
import threading
port = int(sys.argv[sys.argv.index("--port") + 1])
open({pid_file!r}, "w").write(str(__import__("os").getpid()))
with FakeComfyUI(port=port) as server:
    print("fake ComfyUI on", server.url, flush=True)
    threading.Event().wait()
"""


def test_start_server_runs_the_batch_on_a_comfyui_it_starts_and_stops(workflow_file, run_cli, tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text(FAKE_MAIN.format(here=str(HERE), pid_file=str(tmp_path / "pid")))
    inputs(tmp_path / "in", "a")
    code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--start-server",
                                     "--comfyui-dir", comfyui, "--start-timeout", "30")
    assert code == 0, stderr
    [url] = manifest["servers"]
    assert url.startswith("http://127.0.0.1:") and manifest["items"][0]["server"] == url
    assert "fake ComfyUI on " + url in (tmp_path / "out" / "comfyui.log").read_text()
    pid = int((tmp_path / "pid").read_text())
    try:
        os.kill(pid, 0)
        raise AssertionError("the started server still runs")
    except ProcessLookupError:
        pass


def test_start_server_reports_a_comfyui_that_fails_to_start(workflow_file, run_cli, tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text(textwrap.dedent("""
        import sys
        print("Traceback: ModuleNotFoundError: No module named 'torchsde'")
        sys.exit(3)
    """))
    inputs(tmp_path / "in", "a")
    code, stderr, _ = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--start-server",
                              "--comfyui-dir", comfyui, "--comfyui-python", sys.executable)
    assert code == 2
    assert "mv4d-batch: --start-server: ComfyUI exited with code 3 while starting" in stderr
    assert "mv4d-batch: Traceback: ModuleNotFoundError: No module named 'torchsde'" in stderr
