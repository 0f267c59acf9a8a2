"""End to end through a real ComfyUI server that loads this checkout in place."""

import io
import json
from pathlib import Path

import pytest

from mv4d_host_helpers import (WORKFLOWS, execution_error, get_json, load_api_workflow, on_tiny_models, pack_import_failures, post_prompt,
                               run_prompt, view, wait_for_history, wait_until_node_progresses)
from test_host_nodes import EXPECTED_NODES, POSE_LINE

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def test_object_info_lists_every_mv4d_node(comfy_server):
    info = get_json(comfy_server.url + "/object_info")
    ours = {node_id: entry for node_id, entry in info.items() if node_id.startswith("MV4D_")}
    assert {node_id: entry["display_name"] for node_id, entry in ours.items()} == EXPECTED_NODES
    assert all(entry["category"].startswith("mv4d/") and entry["description"] for entry in ours.values())
    assert pack_import_failures(comfy_server.log.read_text()) == []


def test_only_our_own_import_failures_count():
    """Issue 12, item 6: grepping the whole log failed on hosts whose optional audio nodes do not import."""
    log = ("Cannot import /opt/ComfyUI/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'\n"
           "IMPORT FAILED: nodes_audio.py\n"
           "   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/mv4d_other\n"
           "   0.1 seconds: /tmp/base/custom_nodes/mv4d\n")
    assert "Cannot import" in log  # what the lane used to look for: this log failed it
    assert pack_import_failures(log) == []
    broken = log + ("Cannot import /tmp/base/custom_nodes/mv4d module for custom nodes: No module named 'kornia'\n"
                    "   0.0 seconds (IMPORT FAILED): C:\\ComfyUI\\custom_nodes\\mv4d_test_models\n")
    assert pack_import_failures(broken) == broken.splitlines()[-2:]


MAGIC = {".ply": b"ply\n", ".splatv": bytes([0x4B, 0x67, 0, 0]), ".safetensors": None}


@pytest.mark.parametrize("workflow", sorted(path.name for path in (WORKFLOWS / "api").glob("*.json")))
def test_every_shipped_api_workflow_runs(comfy_server, workflow):
    prompt = on_tiny_models(load_api_workflow(workflow))
    known = get_json(comfy_server.url + "/object_info")
    core_missing = sorted({node["class_type"] for node in prompt.values() if not node["class_type"].startswith("MV4D")} - set(known))
    if core_missing:  # a core node this host version lacks (the workflows' video loader, say); ours must all be there
        pytest.skip(f"this ComfyUI has no {', '.join(core_missing)}, which {workflow} uses")
    entry = run_prompt(comfy_server.url, prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = {Path(item["filename"]).suffix for output in entry["outputs"].values() for item in output.get("files", [])}
    for node in prompt.values():
        if node["class_type"] == "MV4D_Save4D":  # the pipeline reached its 4D asset, in every format it asked for
            inputs = node["inputs"]
            wanted = {".safetensors", *[".splatv"] * inputs["splatv"], *[".ply"] * (inputs["ply_sequence"] or inputs["static_ply"])}
            assert wanted <= saved, saved
    images = [item for output in entry["outputs"].values() for item in output.get("images", [])]
    assert images, entry["outputs"]
    from PIL import Image  # a ComfyUI requirement: imported only when a host is there

    for item in images:
        picture = Image.open(io.BytesIO(view(comfy_server.url, item)))
        assert picture.format in ("PNG", "WEBP") and picture.width > 0 and picture.height > 0
    for item in [item for output in entry["outputs"].values() for item in output.get("files", [])]:
        data = view(comfy_server.url, item)  # every saved file comes back through /view
        assert (comfy_server.output_dir / item["subfolder"] / item["filename"]).read_bytes() == data
        suffix = Path(item["filename"]).suffix
        if MAGIC.get(suffix):
            assert data.startswith(MAGIC[suffix]), item
        elif suffix == ".safetensors":
            header_length = int.from_bytes(data[:8], "little")
            assert json.loads(data[8:8 + header_length])["__metadata__"]["format"] == "mv4d.splats4d"


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the frontend's graph-to-prompt does for our simple graphs: widget values in input order, links."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        info = object_info[node["type"]]
        linked = {item["name"]: item["link"] for item in node.get("inputs", []) if item.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                is_widget = isinstance(spec[0], list) or spec[0] in WIDGET_TYPES
                value = next(values) if is_widget else None  # a linked widget keeps its (unused) value
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                elif is_widget:
                    inputs[name] = value
                if is_widget and len(spec) > 1 and spec[1].get("control_after_generate"):
                    next(values)
        assert next(values, None) is None, f"{node['type']} has more widget values than widgets"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("workflow", sorted(path.name for path in WORKFLOWS.glob("*.json")))
def test_ui_workflows_match_their_api_twins(comfy_server, workflow):
    object_info = get_json(comfy_server.url + "/object_info")
    ui = json.loads((WORKFLOWS / workflow).read_text())
    twin = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in load_api_workflow(workflow).items()}
    assert ui_to_api(ui, object_info) == twin


def write_pose_file(folder: Path, name: str, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("https://www.youtube.com/watch?v=test\n" + "\n".join(lines) + "\n")


TRAJECTORY_PROMPT = {
    "1": {"class_type": "MV4D_LoadCameraTrajectory", "inputs": {
        "pose_file": "cameras/dolly.txt", "width": 256, "height": 256, "source_aspect": 1.7778,
        "start_frame": 0, "frame_stride": 1, "max_frames": 16, "relative_to_first": True}},
    "2": {"class_type": "MV4D_EpipolarMask", "inputs": {
        "cameras": ["1", 0], "latent_width": 32, "latent_height": 32, "mode": "soft", "tau": 3.0,
        "reference_resolution": 256, "band_fraction": 0.0234, "decay": 3.0, "slope_seed": 0}},
    "3": {"class_type": "MV4D_PreviewEpipolarMask", "inputs": {
        "epipolar_mask": ["2", 0], "source_view": 0, "target_view": 3, "queries": 3, "query_seed": 2, "panel_height": 128}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mv4d_tests/trajectory"}},
}


def test_a_link_loop_in_the_input_folder_does_not_stop_the_server(comfy_server):
    """Issue 12, item 7: listing files for Load 4D / Load Camera Trajectory followed links, so one loop under
    input/ made /object_info stop answering (and listed every file 41 times)."""
    import time

    loop = comfy_server.input_dir / "loop"
    loop.symlink_to(comfy_server.input_dir, target_is_directory=True)
    try:
        started = time.monotonic()
        info = get_json(comfy_server.url + "/object_info/MV4D_LoadCameraTrajectory")
        assert time.monotonic() - started < 60  # a bound on hanging, not a speed claim
    finally:
        loop.unlink()
    options = info["MV4D_LoadCameraTrajectory"]["input"]["required"]["pose_file"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert len(names) == len(set(names)) and not any(name.startswith("loop/") for name in names)


def test_trajectory_prompt_writes_its_output_file(comfy_server):
    write_pose_file(comfy_server.input_dir / "cameras", "dolly.txt", [POSE_LINE.format(stamp=i * 33366, x=-0.05 * i) for i in range(8)])
    entry = run_prompt(comfy_server.url, TRAJECTORY_PROMPT)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = entry["outputs"]["4"]["images"]
    assert saved[0]["type"] == "output" and saved[0]["subfolder"] == "mv4d_tests"
    from PIL import Image

    path = comfy_server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
    assert Image.open(path).size == (2 * 128 + 8, 128)


def test_bad_input_through_the_server_reports_node_input_and_fix(comfy_server):
    prompt = load_api_workflow("epipolar_mask_preview.json")
    prompt["1"]["inputs"]["views"] = 1
    prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mv4d_tests/never"}}
    entry = run_prompt(comfy_server.url, prompt)
    error = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and error["node_type"] == "MV4D_EpipolarMask"
    assert "MV4D Epipolar Mask: input 'cameras': an epipolar mask needs at least 2 views, got 1. Fix:" in error["exception_message"]
    assert not list(comfy_server.output_dir.glob("mv4d_tests/never*"))

    write_pose_file(comfy_server.input_dir, "broken.txt", [POSE_LINE.format(stamp=0, x=0), "1 2 3 four"])
    broken = json.loads(json.dumps(TRAJECTORY_PROMPT))
    broken["1"]["inputs"]["pose_file"] = "broken.txt"
    error = execution_error(run_prompt(comfy_server.url, broken))
    assert "input 'pose_file': broken.txt: line 3: expected 19 numbers" in error["exception_message"]


def test_missing_pose_file_is_refused_before_anything_runs(comfy_server):
    prompt = json.loads(json.dumps(TRAJECTORY_PROMPT))
    prompt["1"]["inputs"]["pose_file"] = "cameras/not_there.txt"
    status, answer = post_prompt(comfy_server.url, prompt)
    assert status == 400
    messages = json.dumps(answer["node_errors"])
    assert "not_there.txt" in messages and "does not exist in the input folder" in messages


def test_the_template_browser_lists_our_workflows(comfy_server):
    templates = get_json(comfy_server.url + "/workflow_templates")
    shipped = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    assert sorted(templates.get("mv4d", [])) == shipped


def test_interrupting_a_fit_through_the_server_stops_it_and_saves_nothing(comfy_server):
    import time
    import urllib.request

    prompt = load_api_workflow("4d_gaussians_example.json")
    prompt["3"]["inputs"]["iterations"] = 200000  # hours on a CPU: it can only end by the interrupt
    prompt["5"]["inputs"]["filename_prefix"] = "mv4d_tests/interrupted"
    status, answer = post_prompt(comfy_server.url, prompt)
    assert status == 200, answer
    deadline = time.monotonic() + 120
    while not get_json(comfy_server.url + "/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.2)
    time.sleep(3)  # well inside the fit loop
    urllib.request.urlopen(urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", method="POST"), timeout=10)
    entry = wait_for_history(comfy_server.url, answer["prompt_id"], timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds
    assert not list(comfy_server.output_dir.glob("mv4d_tests/interrupted*"))


def test_interrupting_composed_sampling_through_the_server_stops_it_and_saves_nothing(comfy_server):
    import urllib.request
    import uuid

    prompt = on_tiny_models(load_api_workflow("image_to_4d.json"))
    sampler = next(key for key, node in prompt.items() if node["class_type"] == "SamplerCustomAdvanced")
    scheduler = next(node for node in prompt.values() if node["class_type"] == "KarrasScheduler")
    scheduler["inputs"]["steps"] = 5000  # far longer than the test: it can only end by the interrupt
    save = next(node for node in prompt.values() if node["class_type"] == "SaveAnimatedWEBP")
    save["inputs"]["filename_prefix"] = "mv4d_tests/interrupted_grid"
    client_id = str(uuid.uuid4())
    status, answer = post_prompt(comfy_server.url, prompt, client_id)
    assert status == 200, answer
    wait_until_node_progresses(comfy_server.url, client_id, sampler)  # composed sampling is under way
    urllib.request.urlopen(urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", method="POST"), timeout=10)
    entry = wait_for_history(comfy_server.url, answer["prompt_id"], timeout=120)
    interrupted = [data for kind, data in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert entry["status"]["status_str"] == "error" and interrupted
    assert interrupted[0]["node_type"] == "SamplerCustomAdvanced"
    assert not list(comfy_server.output_dir.glob("mv4d_tests/interrupted_grid*"))


def test_interrupting_a_fit_inside_3d_aware_sampling_stops_it_and_saves_nothing(comfy_server):
    import time
    import urllib.request
    import uuid

    prompt = on_tiny_models(load_api_workflow("image_to_4d_3d_aware.json"))
    aware = next(node for node in prompt.values() if node["class_type"] == "MV4D_3DAwareDenoising")
    aware["inputs"].update(steps="2", fit_iterations=100000)  # the most it takes: far longer than the test, only the interrupt ends it
    sampler = next(key for key, node in prompt.items() if node["class_type"] == "SamplerCustomAdvanced")
    for node in prompt.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = "mv4d_tests/interrupted_aware"
    client_id = str(uuid.uuid4())
    status, answer = post_prompt(comfy_server.url, prompt, client_id)
    assert status == 200, answer
    wait_until_node_progresses(comfy_server.url, client_id, sampler)  # steps 0 and 1 done: step 2 fits
    time.sleep(3)  # well inside the fit
    urllib.request.urlopen(urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", method="POST"), timeout=10)
    entry = wait_for_history(comfy_server.url, answer["prompt_id"], timeout=120)
    interrupted = [data for kind, data in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert entry["status"]["status_str"] == "error" and interrupted
    assert interrupted[0]["node_type"] == "SamplerCustomAdvanced"
    assert not list(comfy_server.output_dir.glob("mv4d_tests/interrupted_aware*"))
