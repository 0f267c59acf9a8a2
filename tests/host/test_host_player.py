"""MV4D Preview 4D's player in each host's own frontend, in headless Chromium with software WebGL2 (SwiftShader).

A known scene (mv4d_player_scene.py) goes MV4D Load 4D -> MV4D Preview 4D, queued from the page itself as a user
would. The page is opened as http://mv4d-remote.test:<port>/, a name Chromium resolves to the test server: an
origin that is neither the loopback address nor a secure context, as a browser on another machine sees a
ComfyUI started with --listen. Then: the node shows the player with no console error and no failed request, and asks no host but the
server; the player's picture through one of the scene's cameras at one frame matches the torch rasteriser's
image of that camera and time (PSNR printed), far above what a half-pixel shift, another frame or colour
without its view-dependent part would score; dragging and the wheel move the player's camera and not the graph;
the slider changes the frame shown to that frame's picture; a truncated or foreign file gets a message in the
widget. MV4D Save 4D's standalone page, opened from file://, shows the same picture. All of it with the classic
and the 'Nodes 2.0' node design. Pictures are kept under test-output/player/<ComfyUI version>/<node design>/.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from mv4d_browser import Chromium, ComfyFrontend, find_chromium, js
from mv4d_host_helpers import get_json, run_prompt
from mv4d_player_scene import player_scene, psnr, reference_image
from test_host_browser import errors_of, post_setting, show, summarize

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "player"
SCENE_FILE = "mv4d_player_test.mv4d.safetensors"
CAMERA, FRAME, OTHER_FRAME = 1, 1, 3
REMOTE_NAME = "mv4d-remote.test"  # the server as another machine reaches it (see the module docstring)
MIN_PSNR = 40.0  # measured about 50 dB; a half-pixel shift or a wrong depth order gives under 20 dB

# Load 4D -> Preview 4D on a clean graph, queued from the page (so the 'executed' message comes to this page).
BUILD_AND_QUEUE = """(async (file) => {
    app.graph.clear();
    const load = LiteGraph.createNode('MV4D_Load4D');
    app.graph.add(load);
    load.pos = [40, 120];
    const combo = load.widgets.find(widget => widget.name === 'file');
    const values = typeof combo.options.values === 'function' ? combo.options.values() : combo.options.values;
    if (!values.includes(file)) return {error: `${file} is not among MV4D Load 4D's files: ${values}`};
    combo.value = file;
    const preview = LiteGraph.createNode('MV4D_Preview4D');
    app.graph.add(preview);
    preview.pos = [420, 120];
    load.connect(0, preview, 0);
    window.__mv4dPreview = preview;
    const onExecuted = preview.onExecuted;  // keep what the server sent, to point the widget at it again later
    preview.onExecuted = function (output) { window.__mv4dExecuted = output; return onExecuted.apply(this, arguments); };
    await app.queuePrompt(0, 1);
    return {widgets: preview.widgets.map(widget => widget.name), player: !!preview.mv4dPlayer};
})(%s)"""

PLAYER = "window.__mv4dPreview.mv4dPlayer"

PLAYER_SHOWN = """(() => {
    const player = %s;
    const rect = player.root.getBoundingClientRect(), canvas = player.canvas.getBoundingClientRect();
    const message = getComputedStyle(player.message);
    return {inDocument: document.body.contains(player.root), width: rect.width, height: rect.height,
            canvasWidth: canvas.width, canvasHeight: canvas.height, messageShown: message.display !== 'none',
            messageText: player.message.textContent, state: player.state,
            controls: Array.from(player.controls.querySelectorAll('button, input, select')).map(control => control.title || control.textContent)};
})()""" % PLAYER


def camera_of(scene, index: int) -> dict:
    rig = scene.cameras
    k = rig.intrinsics[index]
    return {"world_to_camera": rig.world_to_camera[index].flatten().tolist(), "fx": float(k[0, 0]), "fy": float(k[1, 1]),
            "cx": float(k[0, 2]), "cy": float(k[1, 2]), "width": rig.width, "height": rig.height}


def capture(browser, player: str, camera: dict | None = None, frame: int | None = None) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the player's canvas, once sorted for the camera and frame."""
    steps = (f"{player}.setCamera({js(camera)});" if camera else "") + (f"{player}.setFrame({frame});" if frame is not None else "")
    url = browser.evaluate(f"(async () => {{ {steps} return await {player}.capture(); }})()")
    from PIL import Image  # a ComfyUI requirement

    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return torch.from_numpy(np.asarray(picture).astype(np.float32) / 255)


def save_png(image: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def shifted(camera: dict, pixels: float) -> dict:
    return camera | {"cx": camera["cx"] + pixels, "cy": camera["cy"] + pixels}


@pytest.fixture(scope="module")
def comfy_version(comfy_server) -> str:
    return get_json(comfy_server.url + "/system_stats")["system"]["comfyui_version"]


@pytest.fixture(scope="module")
def scene(comfy_server):
    from mv4d.kernels.splats.storage import save_splats4d

    scene = player_scene()
    save_splats4d(comfy_server.input_dir / SCENE_FILE, scene)  # before the page loads: Load 4D's list has it
    return scene


NODE_DESIGNS = {"classic": False, "nodes 2.0": True}  # the frontend's Comfy.VueNodes.Enabled setting


@pytest.fixture(scope="module", params=list(NODE_DESIGNS))
def node_design(request, comfy_server):
    """Every test runs with the classic canvas nodes and with the Vue-rendered 'Nodes 2.0' (its widgets are DOM
    elements of their own, and it forwards the wheel to the graph unless a focused element captures it)."""
    post_setting(comfy_server.url, "Comfy.VueNodes.Enabled", NODE_DESIGNS[request.param])
    yield request.param
    post_setting(comfy_server.url, "Comfy.VueNodes.Enabled", False)


@pytest.fixture(scope="module")
def frontend(comfy_server, scene, node_design):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found ($CHROMIUM, chromium, chromium-browser, google-chrome on PATH); the browser tests "
                    "need an installed one and never download a browser")
    post_setting(comfy_server.url, "Comfy.TutorialCompleted", True)
    port = urlsplit(comfy_server.url).port
    with Chromium(chromium, extra_flags=(f"--host-resolver-rules=MAP {REMOTE_NAME} 127.0.0.1",)) as browser:
        yield ComfyFrontend(browser, f"http://{REMOTE_NAME}:{port}", probe_node_type="MV4D_Preview4D")


@pytest.fixture(scope="module")
def pictures(comfy_version, node_design) -> Path:
    return OUTPUT / comfy_version / node_design.replace(" ", "_").replace(".", "")


@pytest.fixture(scope="module")
def preview(frontend, comfy_server, pictures):
    """The page with Load 4D -> Preview 4D run and the player loaded; what the page reported meanwhile."""
    browser = frontend.browser
    frontend.open()
    version = browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? '0'")
    if pictures.name != "classic" and tuple(int(part) for part in version.split(".")[:2]) < (1, 35):
        pytest.skip(f"frontend {version}'s Nodes 2.0 is an early experiment: it shows no DOM widget of ours (nor, here, the "
                    "Load 4D node); the player is tested there with the classic nodes")
    mark, requests = browser.log.mark(), len(browser.requested)
    built = browser.evaluate(BUILD_AND_QUEUE % js(f"{SCENE_FILE} [input]"), timeout=60)
    assert "error" not in built, built["error"]
    assert built["player"] and "mv4d_player" in built["widgets"], built
    browser.wait_for(f"['ready', 'error'].includes({PLAYER}.state.status)", 120, "the player loaded the preview file")
    browser.evaluate(f"{PLAYER}.settled()")
    frontend.settle()
    frontend.fit_view()
    path = browser.screenshot(pictures / "preview_node.png")
    print(f"\nscreenshot of the node: {path}")
    return {"events": browser.log.since(mark), "requests": browser.requested[requests:],
            "executed": browser.evaluate("window.__mv4dExecuted")}


def test_the_preview_node_shows_the_player_without_errors(frontend, comfy_server, preview, scene):
    shown = frontend.browser.evaluate(PLAYER_SHOWN)
    assert shown["state"]["status"] == "ready", shown
    executed = preview["executed"]["mv4d_player"]  # the node's UI output, as the page received it
    assert len(executed) == 1 and executed[0]["type"] == "temp" and executed[0]["filename"].endswith(".mv4dweb"), executed
    assert shown["inDocument"] and shown["width"] > 100 and shown["height"] > 100 and shown["canvasWidth"] > 50, shown
    assert not shown["messageShown"], shown["messageText"]
    assert shown["state"]["count"] == scene.gaussians.count and shown["state"]["frames"] == len(scene.frame_times)
    assert 0 < shown["state"]["drawn"] <= scene.gaussians.count, shown["state"]
    assert {"Play / pause", "Frame", "Frames per second", "Back to the scene's first camera"} <= set(shown["controls"]), shown["controls"]
    errors, noise = errors_of(preview["events"], frontend.server_url)
    if noise:
        print(f"offline noise while previewing (not counted):\n{summarize(noise)}")
    assert not errors, f"the page reported errors while previewing:\n{show(errors)}"
    # what our scripts asked for (the frontend's own look-ups, e.g. of model URLs, are not ours): the file, from
    # the server, by the name the page knows it under
    server = urlsplit(frontend.server_url).netloc
    ours = [request.url for request in preview["requests"] if "/extensions/mv4d/" in request.initiator]
    assert len(ours) == 1 and "/view?" in ours[0] and ".mv4dweb" in ours[0] and urlsplit(ours[0]).netloc == server, preview["requests"]
    files = [request for request in preview["requests"] if ".mv4dweb" in request.url]
    assert [request.url for request in files] == ours, files


def test_the_player_draws_what_the_torch_rasteriser_draws(frontend, preview, scene, pictures):
    browser = frontend.browser
    camera = camera_of(scene, CAMERA)
    picture = capture(browser, PLAYER, camera, FRAME)
    reference = reference_image(scene, CAMERA, FRAME)
    preview["picture"] = picture  # for the standalone page's test
    save_png(picture, pictures / f"player_camera{CAMERA}_frame{FRAME}.png")
    save_png(reference, pictures / f"torch_camera{CAMERA}_frame{FRAME}.png")
    achieved = psnr(picture, reference)
    # what the same comparison gives when one thing is wrong: it must be far below the player's figure
    half_pixel = psnr(capture(browser, PLAYER, shifted(camera, 0.5)), reference)
    other_frame = psnr(picture, reference_image(scene, CAMERA, OTHER_FRAME))
    flat = without_view_dependence(scene)
    no_sh = psnr(picture, reference_image(flat, CAMERA, FRAME))
    print(f"\nplayer vs torch rasteriser, camera {CAMERA}, frame {FRAME}, {camera['width']}x{camera['height']}: PSNR {achieved:.2f} dB "
          f"(half-pixel shift {half_pixel:.2f} dB, frame {OTHER_FRAME} {other_frame:.2f} dB, without view-dependent colour {no_sh:.2f} dB)")
    assert achieved >= MIN_PSNR
    assert max(half_pixel, other_frame, no_sh) < achieved - 10


def without_view_dependence(scene):
    from mv4d.kernels.splats.model import DynamicGaussians, Splats4D

    params = dict(scene.gaussians.params, shN=torch.zeros_like(scene.gaussians.params["shN"]))
    return Splats4D(DynamicGaussians(params, scene.gaussians.config), scene.frame_times, scene.cameras)


def test_dragging_and_the_wheel_move_the_camera_not_the_graph(frontend, preview):
    browser = frontend.browser
    browser.evaluate(f"{PLAYER}.resetView(), {PLAYER}.settled()")
    state = f"JSON.stringify([{PLAYER}.camera.pose(), {PLAYER}.camera.distance, Array.from(app.canvas.ds.offset), app.canvas.ds.scale, Array.from(window.__mv4dPreview.pos)])"
    box = browser.evaluate(f"(() => {{ const r = {PLAYER}.canvas.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
    before = json.loads(browser.evaluate(state))

    def mouse(kind, x, y, **extra):
        browser.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **extra})

    x, y = box
    mouse("mousePressed", x, y, button="left", buttons=1, clickCount=1)
    for step in range(1, 6):
        mouse("mouseMoved", x + 12 * step, y + 4 * step, button="left", buttons=1)
    mouse("mouseReleased", x + 60, y + 20, button="left", buttons=0, clickCount=1)
    dragged = json.loads(browser.evaluate(state))
    mouse("mouseWheel", x, y, deltaX=0, deltaY=120)
    wheeled = json.loads(browser.evaluate(state))
    assert dragged[0]["rotation"] != before[0]["rotation"], "dragging did not orbit the player's camera"
    assert wheeled[1] > dragged[1], "the wheel did not move the player's camera away"
    assert dragged[2:] == before[2:] and wheeled[2:] == before[2:], "the graph moved under the player (offset, scale, node position)"
    browser.evaluate(f"{PLAYER}.resetButton.click(), {PLAYER}.settled()")
    reset = json.loads(browser.evaluate(state))
    assert np.allclose(reset[0]["rotation"], before[0]["rotation"], atol=1e-9), "Reset view did not come back to the first camera"


def test_moving_the_slider_shows_that_frame(frontend, preview, scene, pictures):
    browser = frontend.browser
    camera = camera_of(scene, CAMERA)
    first = capture(browser, PLAYER, camera, FRAME)
    browser.evaluate(f"(() => {{ const slider = {PLAYER}.slider; slider.value = '{OTHER_FRAME}'; "
                     "slider.dispatchEvent(new Event('input', {bubbles: true})); })()")
    assert browser.evaluate(f"{PLAYER}.state.frame") == OTHER_FRAME
    moved = capture(browser, PLAYER)
    save_png(moved, pictures / f"player_camera{CAMERA}_frame{OTHER_FRAME}.png")
    label = browser.evaluate(f"{PLAYER}.frameLabel.textContent")
    assert f"frame {OTHER_FRAME + 1} / {len(scene.frame_times)}" in label, label
    assert psnr(moved, first) < 25, "the picture hardly changed with the frame"
    assert psnr(moved, reference_image(scene, CAMERA, OTHER_FRAME)) >= MIN_PSNR


@pytest.mark.parametrize("kind", ["truncated", "foreign", "missing"])
def test_a_bad_file_gets_a_message_in_the_widget(frontend, comfy_server, preview, scene, kind, tmp_path):
    from mv4d.kernels.splats.player_file import encode_player_file
    from mv4d.kernels.splats.splatv import write_splatv

    name = f"mv4d_bad_{kind}.mv4dweb"
    temp = comfy_server.base / "temp" / "temp"  # ComfyUI's temp folder is "temp" inside --temp-directory
    if kind == "truncated":
        data = encode_player_file(scene)
        (temp / name).write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        write_splatv(temp / name, scene.gaussians)
    expected = {"truncated": "truncated", "foreign": "a .splatv file", "missing": "HTTP 404"}[kind]
    browser = frontend.browser
    mark = browser.log.mark()
    browser.evaluate(f"window.__mv4dPreview.onExecuted({{mv4d_player: [{{filename: {js(name)}, subfolder: '', type: 'temp'}}]}})")
    browser.wait_for(f"{PLAYER}.state.status === 'error'", 30, f"the player refused the {kind} file")
    shown = browser.evaluate(PLAYER_SHOWN)
    assert shown["messageShown"] and expected in shown["messageText"], shown["messageText"]
    message_box = browser.evaluate(f"(() => {{ const r = {PLAYER}.message.getBoundingClientRect(); return [r.width, r.height]; }})()")
    assert message_box[0] >= shown["canvasWidth"] - 1 and message_box[1] >= shown["canvasHeight"] - 1, "the message does not cover the canvas"
    print(f"\n{kind}: {shown['messageText']}")
    errors, _ = errors_of(browser.log.since(mark), frontend.server_url)
    if kind == "missing":  # the 404 itself is the one failed request
        assert all("404" in event.text for event in errors), show(errors)
    else:
        assert not errors, show(errors)


def test_the_standalone_page_from_disk_shows_the_same_picture(frontend, comfy_server, preview, scene, pictures):
    prompt = {
        "1": {"class_type": "MV4D_Load4D", "inputs": {"file": f"{SCENE_FILE} [input]"}},
        "2": {"class_type": "MV4D_Save4D", "inputs": {"splats_4d": ["1", 0], "filename_prefix": "mv4d_player/scene", "splatv": True,
                                                    "ply_sequence": False, "static_ply": False, "static_time": 0.5}},
    }
    entry = run_prompt(comfy_server.url, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pages = [item for item in entry["outputs"]["2"]["files"] if item["filename"].endswith(".html")]
    assert len(pages) == 1, entry["outputs"]["2"]
    page = comfy_server.output_dir / pages[0]["subfolder"] / pages[0]["filename"]
    assert (page.with_name(page.name[: -len(".html")] + ".splatv")).is_file()  # next to its .splatv

    browser = frontend.browser
    camera = camera_of(scene, CAMERA)
    if "picture" not in preview:  # the widget's picture, unless the comparison with torch took it already
        browser.evaluate(f"window.__mv4dPreview.onExecuted({js(preview['executed'])})")
        browser.wait_for(f"{PLAYER}.state.status === 'ready'", 60, "the player loaded the preview file again")
        preview["picture"] = capture(browser, PLAYER, camera, FRAME)
    browser.new_page()
    mark, requests = browser.log.mark(), len(browser.requested)
    browser.navigate(page.as_uri())
    browser.wait_for("window.mv4dPlayer && ['ready', 'error'].includes(mv4dPlayer.state.status)", 60, "the standalone page loaded")
    state = browser.evaluate("mv4dPlayer.state")
    assert state["status"] == "ready", state
    browser.evaluate("mv4dPlayer.settled()")
    path = browser.screenshot(pictures / "standalone_page.png")
    print(f"\nscreenshot of the standalone page: {path}")
    on_disk = capture(browser, "mv4dPlayer", camera, FRAME)
    save_png(on_disk, pictures / f"standalone_camera{CAMERA}_frame{FRAME}.png")
    errors, _ = errors_of(browser.log.since(mark), comfy_server.url)
    assert not errors, show(errors)
    assert not [request for request in browser.requested[requests:] if urlsplit(request.url).scheme in ("http", "https")], "the page asked a server"
    achieved = psnr(on_disk, reference_image(scene, CAMERA, FRAME))
    print(f"standalone page vs torch rasteriser: PSNR {achieved:.2f} dB")
    assert achieved >= MIN_PSNR
    assert torch.equal(on_disk, preview["picture"]), "the page and the widget show different pictures"
