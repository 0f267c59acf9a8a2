"""mv4d-batch against a server that answers JSON of the wrong shape, names colliding or unsavable outputs,
never answers a download, or cannot start (issue 12, items 3, 5, 18, 19, 20). Every such answer must fail its
item with a clear message in the manifest (or stop the batch before anything runs, for /object_info), and the
batch must go on with the next items; nothing is left half-downloaded."""

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runner_fake_comfyui import FakeComfyUI, image_workflow
from runner_helpers import write_png

ROOT = Path(__file__).resolve().parents[2]


def first_only(change, applies=lambda answer: True):
    """A tamper function that changes only the first answer it applies to (the next items get true answers)."""
    done = []

    def tamper(answer):
        if done or not applies(answer):
            return answer
        done.append(True)
        return change(answer)

    return tamper


def finished(answer) -> bool:  # a /history answer that holds the entry
    return bool(answer)


def entry_of(answer) -> dict:
    return next(iter(answer.values()))


def with_entry(change):
    def tamper(answer):
        key = next(iter(answer))
        return {key: change(answer[key])}
    return tamper


WRONG_SHAPES = {
    "history as a list": ("history", first_only(lambda answer: [entry_of(answer)], finished),
                          "GET /history/{id} on {url}: unexpected answer: the answer is a list"),
    "entry as a string": ("history", first_only(with_entry(lambda entry: "success"), finished),
                          "GET /history/{id} on {url}: unexpected answer: the entry of {id} is a string ('success')"),
    "status as a string": ("history", first_only(with_entry(lambda entry: {**entry, "status": "success"}), finished),
                           "GET /history/{id} on {url}: unexpected answer: its 'status' is a string ('success')"),
    "messages not pairs": ("history", first_only(with_entry(lambda entry: {**entry, "status": {"messages": ["boom"]}}), finished),
                           "GET /history/{id} on {url}: unexpected answer: a status message is a string ('boom'), expected a [kind, {{data}}] pair"),
    "outputs as a list": ("history", first_only(with_entry(lambda entry: {**entry, "outputs": [1, 2]}), finished),
                          "GET /history/{id} on {url}: unexpected answer: its 'outputs' is a list ([1, 2])"),
    "an output as a list": ("history", first_only(with_entry(lambda entry: {**entry, "outputs": {"4": ["x.png"]}}), finished),
                            "GET /history/{id} on {url}: unexpected answer: the outputs of node 4 is a list"),
    "a NUL in a file name": ("history", first_only(with_entry(lambda entry: {**entry, "outputs": {"4": {"images": [
        {"filename": "a\0b.png", "subfolder": "", "type": "output"}]}}}), finished),
        "the outputs of prompt {id} on {url}: unexpected answer: a file name of node 4 is a string ('a\\x00b.png'), "
        "expected a non-empty string without NUL"),
    "a subfolder that is a number": ("history", first_only(with_entry(lambda entry: {**entry, "outputs": {"4": {"images": [
        {"filename": "b.png", "subfolder": 7, "type": "output"}]}}}), finished),
        "the outputs of prompt {id} on {url}: unexpected answer: the subfolder of 'b.png' is a number (7), expected a string"),
    "an upload without subfolder": ("upload", first_only(lambda answer: {"name": answer["name"], "type": "input"}),
                                    "upload of a.png to {url}: unexpected answer: 'subfolder' is null (None), expected a string"),
    "an upload answer as a list": ("upload", first_only(lambda answer: [answer]),
                                   "upload of a.png to {url}: unexpected answer: the answer is a list"),
    "a prompt id that is a number": ("prompt", first_only(lambda answer: {**answer, "prompt_id": 123}),
                                     "POST /prompt on {url}: unexpected answer: 'prompt_id' is a number (123)"),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_a_wrong_shape_answer_fails_its_item_clearly_and_the_batch_goes_on(case, workflow_file, run_cli, tmp_path):
    route, tamper, expected = WRONG_SHAPES[case]
    for name in ("a", "b"):
        write_png(tmp_path / "in" / f"{name}.png")
    with FakeComfyUI(tamper={route: tamper}) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    a, b = manifest["items"]
    assert code == 1 and "Traceback" not in stderr
    assert a["status"] == "error" and b["status"] == "done"  # the batch went on
    assert a["error"].startswith(expected.format(id=a["prompt_id"], url=fake.url)), a["error"]
    assert a["files"] == [] and f"mv4d-batch: a: {a['error']}" in stderr
    assert not list((tmp_path / "out").rglob("*.part"))


@pytest.mark.parametrize("object_info, expected", [
    ({"LoadImage": ["not", "an", "object"]}, "the entry of LoadImage is a list"),
    ({**__import__("runner_fake_comfyui").OBJECT_INFO, "SaveImage": {"input": {"required": ["images"]}}},
     "the 'required' inputs of SaveImage is a list"),
    ([1, 2], "the answer is a list"),
])
def test_an_object_info_of_the_wrong_shape_stops_the_batch_before_anything_runs(object_info, expected, workflow_file, run_cli, tmp_path):
    write_png(tmp_path / "in" / "a.png")
    with FakeComfyUI(tamper={"object_info": lambda answer: object_info}) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
        assert fake.uploads == {} and fake.received == []
    assert code == 2 and manifest is None and "Traceback" not in stderr
    assert f"mv4d-batch: GET /object_info failed: GET /object_info on {fake.url}: unexpected answer: {expected}" in stderr


def test_combo_options_of_the_wrong_type_are_not_read_as_options(workflow_file, run_cli, tmp_path):
    write_png(tmp_path / "in" / "a.png")
    info = json.loads(json.dumps(__import__("runner_fake_comfyui").OBJECT_INFO))
    info["ImageScale"]["input"]["required"]["upscale_method"] = ["COMBO", {"options": 5}]
    with FakeComfyUI(object_info=info) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 0 and manifest["items"][0]["status"] == "done", stderr


def test_a_queue_of_the_wrong_shape_while_timing_out_fails_the_item_clearly(workflow_file, run_cli, tmp_path):
    write_png(tmp_path / "in" / "a.png")
    with FakeComfyUI(hold=True, tamper={"queue": lambda answer: {"queue_running": {"0": answer["queue_running"]}}}) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url,
                                         "--timeout", "0.5")
    [item] = manifest["items"]
    assert code == 1 and item["status"] == "error" and "Traceback" not in stderr
    assert item["error"].startswith(f"timed out after 0.5 s (prompt {item['prompt_id']} not taken off the server: GET /queue on "
                                    f"{fake.url}: unexpected answer: 'queue_running' is an object")


SERVER_FILES = {("output", "s", "b.png"): b"output s/b", ("temp", "s", "b.png"): b"temp s/b",
                ("output", "s/z", "b.png"): b"output s/z/b", ("temp", "", "c.png"): b"temp c"}


def colliding_outputs(answer):
    """Outputs that all used to be saved as <item>/s/b.png (or <item>/c.png), whatever folder they are in."""
    def change(entry):
        return {**entry, "outputs": {"9": {"images": [
            {"filename": "b.png", "subfolder": "s", "type": "output"},
            {"filename": "b.png", "subfolder": "s", "type": "temp"},
            {"filename": "b.png", "subfolder": "s/z", "type": "output"},
            {"filename": "z/b.png", "subfolder": "s", "type": "output"},  # /view serves s/b.png for it (the base name)
            {"filename": "c.png [temp]", "subfolder": ""},  # /view reads the annotation: temp/c.png
        ]}}}
    return with_entry(change)(answer) if answer else answer


def test_outputs_in_different_folders_never_share_a_local_file_and_the_manifest_matches_the_disk(workflow_file, run_cli, tmp_path):
    write_png(tmp_path / "in" / "a.png")
    with FakeComfyUI(tamper={"history": colliding_outputs}) as fake:
        fake.files.update(SERVER_FILES)
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 0, stderr
    files = manifest["items"][0]["files"]
    assert [(file["subfolder"], file["filename"], file["type"], file["path"]) for file in files] == [
        ("s", "b.png", "output", "a/output/s/b.png"), ("s", "b.png", "temp", "a/temp/s/b.png"),
        ("s/z", "b.png", "output", "a/output/s/z/b.png"), ("s", "z/b.png", "output", "a/output/s/b.png"),
        ("", "c.png [temp]", "output", "a/temp/c.png")]
    on_disk = sorted(path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out" / "a").rglob("*") if path.is_file())
    assert on_disk == ["a/output/s/b.png", "a/output/s/z/b.png", "a/temp/c.png", "a/temp/s/b.png"]
    for file in files:
        content = (tmp_path / "out" / file["path"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == file["sha256"] and len(content) == file["bytes"], file
    assert (tmp_path / "out/a/output/s/b.png").read_bytes() == SERVER_FILES[("output", "s", "b.png")]
    assert (tmp_path / "out/a/temp/s/b.png").read_bytes() == SERVER_FILES[("temp", "s", "b.png")]
    assert fake.views_asked == 4  # the output named twice (b.png and z/b.png in s) was fetched once


@pytest.mark.parametrize("subfolder, filename", [("..", "x.png"), ("ok/../..", "x.png"), ("ok", ".."), ("a\x01b", "x.png"), ("C:", "x.png"), ("", "/")])
def test_an_output_that_cannot_be_saved_in_the_items_folder_fails_the_item(subfolder, filename, workflow_file, run_cli, tmp_path):
    write_png(tmp_path / "in" / "a.png")
    bad = {"filename": filename, "subfolder": subfolder, "type": "output"}
    tamper = first_only(with_entry(lambda entry: {**entry, "outputs": {"4": {"images": [bad]}}}), finished)
    with FakeComfyUI(tamper={"history": tamper}) as fake:
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url)
    [item] = manifest["items"]
    assert code == 1 and item["error"].startswith("the server named an output that cannot be saved in the item's folder")
    assert not (tmp_path / "x.png").exists() and "Traceback" not in stderr


def test_the_timeout_covers_downloads_and_leaves_no_partial_file(workflow_file, run_cli, tmp_path):
    for name in ("a", "b"):
        write_png(tmp_path / "in" / f"{name}.png")
    with FakeComfyUI(hang_view=True) as fake:
        started = time.monotonic()
        code, stderr, manifest = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--server", fake.url,
                                         "--timeout", "1")
        took = time.monotonic() - started
    a, b = manifest["items"]
    assert code == 1 and a["status"] == b["status"] == "error"  # both tried: the batch went on
    assert a["error"].startswith("timed out after 1 s downloading ") and fake.views_asked == 2
    assert took < 60  # not the 300 s a read may take without --timeout (a bound on hanging, not a speed claim)
    assert not [path for path in (tmp_path / "out").rglob("*") if path.name.endswith(".part")]


def test_partial_downloads_of_a_killed_runner_are_removed_when_the_item_is_redone(tmp_path):
    custom_nodes = tmp_path / "custom_nodes"  # run as a command, so that it can be killed like one
    custom_nodes.mkdir()
    (custom_nodes / "mv4d").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "flow.json").write_text(json.dumps(image_workflow()))
    write_png(tmp_path / "in" / "a.png")
    command = [sys.executable, "-m", "mv4d.runner", str(tmp_path / "flow.json"), str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    def downloads_in_progress():
        # the manifest is also written through a brief '.manifest.json.<random>.part': not a download
        return [path for path in (tmp_path / "out").rglob("*.part") if not path.name.startswith(".manifest.json.")]

    with FakeComfyUI(hang_view=True) as fake:
        process = subprocess.Popen(command + ["--server", fake.url], cwd=custom_nodes, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            fake.wait_until(downloads_in_progress, timeout=60)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        left = downloads_in_progress()
        assert left and all(path.name.startswith(".") for path in left)
    with FakeComfyUI() as fake:
        result = subprocess.run(command + ["--server", fake.url], cwd=custom_nodes, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "out").rglob("*.part"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["items"][0]["status"] == "done"


def test_a_workflow_without_an_input_node_runs_once_when_no_inputs_are_given(fake, run_cli, tmp_path):
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "example"}}}
    (tmp_path / "example.json").write_text(json.dumps(workflow))
    code, stderr, manifest = run_cli(tmp_path / "example.json", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 0, stderr
    [item] = manifest["items"]
    assert item["name"] == "example" and item["status"] == "done" and fake.uploads == {}
    assert [file["path"] for file in item["files"]] == ["example/output/example_00001_.png"]
    code, stderr, again = run_cli(tmp_path / "example.json", "--output", tmp_path / "out", "--server", fake.url)
    assert code == 0 and "1 item(s) already done" in stderr and len(fake.received) == 1  # resumes like any batch
    code, stderr, _ = run_cli(tmp_path / "example.json", tmp_path / "x.png", "--output", tmp_path / "out2", "--server", fake.url)
    assert code == 2 and "the workflow has no input node to feed the inputs into" in stderr and "give no inputs" in stderr


@pytest.mark.parametrize("comfyui_args", ["--cpu", "--cpu --lowvram"])
def test_comfyui_args_take_the_documented_form_with_a_dash(comfyui_args, workflow_file, run_cli, tmp_path):
    """Item 3: --comfyui-args "--cpu" (the form --help shows) was refused by argparse: "expected one argument"."""
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text(textwrap.dedent(f"""
        import sys
        open({str(tmp_path / 'argv.json')!r}, "w").write(__import__("json").dumps(sys.argv[1:]))
        sys.exit(4)
    """))
    write_png(tmp_path / "in" / "a.png")
    code, stderr, _ = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--start-server",
                              "--comfyui-dir", comfyui, "--comfyui-args", comfyui_args)
    assert code == 2 and "expected one argument" not in stderr and "exited with code 4" in stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[-len(comfyui_args.split()):] == comfyui_args.split()


def test_a_comfyui_without_a_gpu_is_reported_with_what_to_pass_and_no_terminal_codes(workflow_file, run_cli, tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text(textwrap.dedent("""
        import sys
        print("\\x1b[31mTraceback (most recent call last):\\x1b[0m")
        print("\\x1b[1;33mAssertionError: Torch not compiled with CUDA enabled\\x1b[0m")
        sys.exit(1)
    """))
    write_png(tmp_path / "in" / "a.png")
    code, stderr, _ = run_cli(workflow_file, tmp_path / "in", "--output", tmp_path / "out", "--start-server", "--comfyui-dir", comfyui)
    assert code == 2 and "\x1b" not in stderr
    assert "mv4d-batch: AssertionError: Torch not compiled with CUDA enabled" in stderr
    assert "add --comfyui-args=--cpu" in stderr
