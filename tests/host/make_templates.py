"""Make a shipped template's UI file and thumbnail from its API twin, with ComfyUI's own frontend (a developer
tool, not a test): the frontend arranges the API prompt (app.loadApiJson); from that layout, the prompt and the
server's /object_info we write the UI file in the format every supported frontend loads (sockets for links,
widget values in input order), with the template's notes and its loaders' model metadata, then picture the graph
as the frontend draws it for workflows/<name>.jpg.

    python -P tests/host/make_templates.py text_to_3d_mvdream image_to_3d_imagedream

Needs a ComfyUI host ($COMFYUI_DIR or ~/ComfyUI) and Chromium, as the browser tests do. The host lane then checks
that each template loads in all three frontends as its API twin (test_host_browser.py, test_host_server.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the checkout as package mv4d, as the test suite's root conftest makes it
_suite = importlib.util.spec_from_file_location("mv4d_suite_conftest", HERE.parent / "conftest.py")
_suite.loader.exec_module(importlib.util.module_from_spec(_suite))

# What each template says beside its graph (Markdown), shown above it in this order.
NOTES = {
    "text_to_3d_mvdream": [
        "## Text -> 4 views (MVDream) -> 3D Gaussians\n\nMVDream makes four orthogonal views of the prompt in one sampling "
        "(multi-view attention, one camera per view). MV4D Decode Grid turns them into a multi-view set with its cameras; "
        "MV4D Fit 4D Gaussians with every motion term at 0 fits static 3D Gaussians to it; the result is saved as a "
        "turntable and an INRIA .ply.",
        "## Model files\n\n`sd-v2.1-base-4view.pt` (or `sd-v1.5-4view.pt`) from huggingface.co/MVDream/MVDream into "
        "`ComfyUI/models/checkpoints/`. The file holds its text encoder and VAE.",
        "## Smaller GPUs\n\nMVDream runs at 256 px: 4 views with CFG are one batch of 8, a few GB of VRAM. Lower "
        "`steps` to go faster; lower the fit's iterations for a quicker, rougher .ply.",
    ],
    "image_to_3d_imagedream": [
        "## Image -> 4 views (ImageDream) -> 3D Gaussians\n\nImageDream makes four views of the object in the input image "
        "(image prompt + the pixel controller's extra view, which MV4D Decode Grid drops); the views are fitted with "
        "static 3D Gaussians and saved as a turntable and an INRIA .ply. Use an object centred on a white background.",
        "## Model files\n\n`sd-v2.1-base-4view-ipmv.pt` from huggingface.co/Peng-Wang/ImageDream into "
        "`ComfyUI/models/checkpoints/`. If the loader says the file has no text encoder, VAE or CLIP vision, load them "
        "with core Load CLIP (SD2.1's OpenCLIP ViT-H text encoder), Load VAE and Load CLIP Vision "
        "(CLIP-ViT-H-14-laion2B-s32B-b79K) and connect those instead.",
        "## Smaller GPUs\n\nImageDream runs at 256 px with 5 views: a batch of 10 with CFG. Lower `steps` to go faster.",
    ],
    "image_to_4d_3d_aware": [
        "# Image -> 4D with 3D-aware denoising (Diffusion² + VideoMV)\nThe `image_to_4d` graph with **MV4D 3D-Aware "
        "Denoising** between MV4D Composed Guider and the sampler: at steps 20, 30 and 40 of 50 the predicted clean grid "
        "is decoded, fitted with 4D Gaussians (each step continues the previous step's), rendered at every view and "
        "frame, encoded, and replaces the prediction (`blend_weight` 1, as VideoMV). **MV4D 3D-Aware Reconstruction** "
        "gives the last step's Gaussians: they are the 4D asset (turntable + `.splatv` / `.ply` in `output/mv4d/`), "
        "with no separate fit.\n\nInput: an object centred on a **white background**, square (*Input image*).",
        "## Model files (ComfyUI/models/checkpoints)\n- `svd_xt.safetensors`: "
        "[stabilityai/stable-video-diffusion-img2vid-xt](https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt)\n"
        "- `sv3d_p.safetensors`: [stabilityai/sv3d](https://huggingface.co/stabilityai/sv3d)\nBoth are gated: accept the "
        "licence on the page, download, put them in `ComfyUI/models/checkpoints/`, press R.",
        "## Smaller GPUs\nEverything in `image_to_4d`'s note applies (size, frames, steps, `videos_per_call`). Each 3D-aware "
        "step also decodes and re-encodes the whole grid and runs `fit_iterations` fit iterations at `fit_resolution`: "
        "list fewer `steps`, lower `frames_per_decode` (14 -> 7) if decoding runs out of memory, lower `fit_iterations` "
        "to go faster. `bench/aware_step.py` measures a step.\n\nFor a finer 4D asset, add a late step (e.g. `20, 30, 40, 49`) "
        "or fit the decoded grid with MV4D Fit 4D Gaussians as `image_to_4d` does.",
    ],
}

NOTES["text_to_video_animatediff"] = [
    "## Text -> video (AnimateDiff v3)\n\nAny Stable Diffusion 1.5 checkpoint + AnimateDiff's v3 motion module "
    "(MV4D Apply Motion Module injects it through ComfyUI's model patching, so LoRA and core samplers work). The "
    "latent batch is the video: `frames` latents of `size` px. DDIM 25 steps, CFG 7.5, AnimateDiff's noise schedule.",
    "## Model files\n\nAn SD1.5 checkpoint in `ComfyUI/models/checkpoints/`; `v3_sd15_mm.ckpt` from "
    "huggingface.co/guoyww/animatediff in `ComfyUI/models/animatediff_models/` (the folder AnimateDiff-Evolved uses; "
    "v1, v2 and diffusers MotionAdapter files load too).",
    "## Smaller GPUs\n\n16 frames at 256 px take a few GB; 512 px about four times the memory and time. Lower "
    "`frames` or `size`; the motion module holds at most 32 frames (v1: 24).",
]
NOTES["text_to_video_cameractrl"] = [
    "## Text + camera path -> video (CameraCtrl)\n\nAnimateDiff v3 with CameraCtrl: each frame's camera (here an arc of "
    "the orbit, one camera per frame; MV4D Load Camera Trajectory reads RealEstate10K pose files) becomes Plücker rays, "
    "relative to the first camera, that steer the motion modules.",
    "## Model files\n\nAn SD1.5 checkpoint in `models/checkpoints/`; `v3_sd15_mm.ckpt` and `CameraCtrl.ckpt` "
    "(huggingface.co/hehao13/CameraCtrl; or AnimateDiff-Evolved's `CameraCtrl_pruned.safetensors`) in "
    "`models/animatediff_models/`.",
    "## Smaller GPUs\n\nAs for AnimateDiff, plus the pose encoder (a few hundred MB). CameraCtrl was trained on 16 "
    "frames at 256 x 384; its pose encoder holds at most 16 frames.",
]

NOTES["vividzoo_text_to_4d"] = [
    "## Text -> multi-view video -> 4D (Vivid-ZOO)\n\nMVDream 1.5 (4 views, multi-view attention, camera per view) + AnimateDiff "
    "v2 (temporal attention per view) in one UNet call over the 4 x 16 grid, joined by Vivid-ZOO's alignment layers. "
    "Vivid-ZOO released no weights: with no adapters connected they are zero (the naive composition); train your own "
    "with the vividzoo_train_adapters workflow and connect MV4D Load Alignment Adapters. Then a 4D Gaussian fit, "
    "turntable and .splatv.",
    "## Model files\n\n`sd-v1.5-4view.pt` (huggingface.co/MVDream/MVDream) in `models/checkpoints/`; `mm_sd_v15_v2.ckpt` "
    "(huggingface.co/guoyww/animatediff) in `models/animatediff_models/`; your adapters in `models/mv4d_adapters/`.",
    "## Smaller GPUs\n\n4 views x 16 frames at 256 px is one UNet call of 128 images with CFG (bench/RESULTS.md has the "
    "memory): lower `frames` (8) or `views` first.",
]
FOURDM_FILES = (
    "## Model files\n\n`sd-v2.1-base-4view-ipmv.pt` (ImageDream, huggingface.co/Peng-Wang/ImageDream) in `models/checkpoints/`: 4DM's "
    "base. `4dm.ckpt` from 4Diffusion's release (a Google Drive folder linked from github.com/aejion/4Diffusion) in "
    "`models/animatediff_models/`. If the loader says the base has no text encoder, VAE or CLIP vision, load them with core "
    "Load CLIP (SD2.1's OpenCLIP ViT-H), Load VAE and Load CLIP Vision (CLIP-ViT-H-14-laion2B-s32B-b79K) and connect those.")
NOTES["video_to_multiview_4dm"] = [
    "## Video -> multi-view video (4Diffusion's 4DM)\n\n4DM is ImageDream with motion modules: each of `frames` frames of the "
    "monocular video (*Input video*, core LoadVideo, names `mv4d_input.mp4`) is the image prompt and the pixel controller's "
    "image of its own frame, and one KSampler run makes `views` x `frames` images (views attend to each other per frame, "
    "frames per view). View 0 looks from the video's side. Use an object centred on a white background.",
    FOURDM_FILES,
    "## Smaller GPUs\n\n4 views + the controller view x 8 frames at 256 px is one UNet call of 80 images with CFG "
    "(bench/RESULTS.md has the memory). 4DM was trained on 8 frames; up to 32 run (its position table), quality beyond 8 is "
    "not measured. Lower `frames` first.",
]
NOTES["video_to_4d_4diffusion"] = [
    "## Video -> 4D (4Diffusion)\n\nThe `video_to_multiview_4dm` graph, then MV4D Fit 4D Gaussians on the 4DM video and "
    "**MV4D Refine 4D with SDS**: 4DM's score on renders at random turns of the cameras over random 8-frame windows "
    "(x0-reconstruction SDS, CFG 5) plus the anchor loss of view 0's render to the input video (100 x (1 - SSIM); LPIPS "
    "200 when its weights are in models/lpips). Turntable + `.splatv` / `.ply` per frame in `output/mv4d/`.",
    FOURDM_FILES,
    "## Smaller GPUs\n\nEach SDS iteration is one 4DM call with CFG (80 images at 256 px) plus the renders' encoding with "
    "gradients (8 images at a time); lower `frames` or the refinement's `window_frames` first, `iterations` to go faster. "
    "`bench/fourdm_step.py` measures a step and an iteration.",
]
NOTES["vividzoo_train_adapters"] = [
    "## Train alignment adapters on demo data (Vivid-ZOO)\n\nMV4D Make Demo Training Set renders the pack's synthetic "
    "scene from random orbits (no dataset needed); MV4D Train Alignment Adapters trains only the alignment layers "
    "(MVDream and AnimateDiff stay frozen), writes models/mv4d_adapters/vividzoo_demo.safetensors every 100 steps, and "
    "the result samples a multi-view video. Your own data: a folder of *.mv4d_clip.safetensors clips (README).",
    "## Model files\n\nAs vividzoo_text_to_4d: `sd-v1.5-4view.pt` in `models/checkpoints/`, `mm_sd_v15_v2.ckpt` in "
    "`models/animatediff_models/`.",
    "## Smaller GPUs\n\nTraining keeps the 128-image grid's activations for the backward pass: gradient checkpointing "
    "(on here) trades time for memory; lower `frames` to fit. For long runs use `mv4d-train-adapters` (README).",
]
CVD_FILES = ("## Model files\n\nAn SD1.5 checkpoint in `models/checkpoints/`; in `models/animatediff_models/`: "
             "`v3_sd15_mm.ckpt` (huggingface.co/guoyww/animatediff), `CameraCtrl.ckpt` (huggingface.co/hehao13/CameraCtrl) "
             "and `CVD.ckpt`, CVD's synchronisation module (the Google Drive link in the README of "
             "github.com/CollaborativeVideoDiffusion/CVD; it is read as weights only, or convert it once to "
             "`CVD.safetensors`, see mv4d's README).")
NOTES["text_to_videos_cvd"] = [
    "## Text + 2 camera paths -> 2 videos of one scene (CVD)\n\nAnimateDiff v3 + CameraCtrl + CVD's synchronisation "
    "modules: MV4D Apply CVD takes one trajectory per video (here two arcs that start at the same camera and turn "
    "opposite ways, as CVD's pose pairs do; MV4D Load Camera Trajectory reads RealEstate10K pose files) and gives one "
    "latent of every video's frames. At each frame the two videos attend to each other near the epipolar lines of "
    "their cameras, so they show the same scene. DDIM 25 steps, CFG 8.5 (CVD's setting).",
    CVD_FILES,
    "## Smaller GPUs\n\nTwo 16-frame videos at 256 px are one batch of 64 latents with CFG; their epipolar masks take "
    "72 MB in fp16 (`mask_cache_mb` bounds what is kept). Lower `frames` or `size` (a multiple of 64). CameraCtrl holds at "
    "most 16 frames.",
]
NOTES["text_to_4d_cvd"] = [
    "## Text + 4 camera paths on one orbit -> 4 videos -> 4D Gaussians (CVD)\n\nFour trajectories, each a quarter "
    "of one orbit, make four synchronised videos of the prompt (MV4D Apply CVD pairs the videos at random at every "
    "step; `matchings` averages several pairings). Because every camera lies on one orbit, the videos are a "
    "multi-view video with moving cameras: MV4D Decode Grid passes every video's cameras on, and MV4D Fit 4D "
    "Gaussians fits them; a turntable and the 4D files are saved.",
    CVD_FILES,
    "## Smaller GPUs\n\nFour 16-frame videos at 256 px are one batch of 128 latents with CFG and 430 MB of masks "
    "in fp16. Lower `frames`, `size` (a multiple of 64) or the fit's iterations; use 2 videos "
    "(text_to_videos_cvd) on small cards.",
]

NOTES["text_to_4d_composed"] = [
    "## Text -> multi-view video -> 4D by composition (Diffusion² with AnimateDiff + MVDream)\n\nNo training: each step "
    "AnimateDiff denoises every row of the 4 x 16 grid (one view over time) and MVDream every column (the 4 views at one "
    "time), and MV4D Composed Guider mixes their x0 per cell (constant 0.6 toward MVDream, side views more). As in "
    "Diffusion², a reference column (MVDream's 4 views) and a reference row (AnimateDiff's video at view 0, started from "
    "view 0 of that column) come first and stay fixed in the grid. MVDream's scheduler gives the noise levels both "
    "models were trained on (AnimateDiff's schedule reaches higher ones). Then a 4D Gaussian fit, turntable and .splatv.",
    "## Model files\n\nAn SD1.5 checkpoint (`v1-5-pruned-emaonly-fp16.safetensors`) and `sd-v1.5-4view.pt` "
    "(huggingface.co/MVDream/MVDream) in `models/checkpoints/`; `mm_sd_v15_v2.ckpt` (huggingface.co/guoyww/animatediff) "
    "in `models/animatediff_models/`.",
    "## Smaller GPUs\n\nTwo UNets share the GPU and each step runs both over the whole grid (64 images, with CFG), in "
    "chunks sized to free memory (`videos_per_call`, `multiview_sets_per_call`: 1 is the least memory). Lower `frames` "
    "(8) or `steps` first. Against vividzoo_text_to_4d (one UNet call over the grid with trained alignment layers): this "
    "needs no training and no adapters, and costs about two UNets' work per step (bench/RESULTS.md).",
]

# Where the models our loaders name come from (ComfyUI model metadata: the frontend offers them when missing).
MODEL_PAGES = {
    "svd_xt.safetensors": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt/resolve/main/svd_xt.safetensors",
    "sv3d_p.safetensors": "https://huggingface.co/stabilityai/sv3d/resolve/main/sv3d_p.safetensors",
    "sd-v2.1-base-4view.pt": "https://huggingface.co/MVDream/MVDream/resolve/main/sd-v2.1-base-4view.pt",
    "sd-v1.5-4view.pt": "https://huggingface.co/MVDream/MVDream/resolve/main/sd-v1.5-4view.pt",
    "sd-v2.1-base-4view-ipmv.pt": "https://huggingface.co/Peng-Wang/ImageDream/resolve/main/sd-v2.1-base-4view-ipmv.pt",
    "v1-5-pruned-emaonly-fp16.safetensors": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    "v3_sd15_mm.ckpt": "https://huggingface.co/guoyww/animatediff/resolve/main/v3_sd15_mm.ckpt",
    "mm_sd_v15_v2.ckpt": "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    "CameraCtrl.ckpt": "https://huggingface.co/hehao13/CameraCtrl/resolve/main/CameraCtrl.ckpt",
}
# loader node -> the (input, models folder) of each file it names
LOADER_INPUTS = {"MV4D_LoadMultiviewModel": [("ckpt_name", "checkpoints")], "ImageOnlyCheckpointLoader": [("ckpt_name", "checkpoints")],
                 "CheckpointLoaderSimple": [("ckpt_name", "checkpoints")], "MV4D_LoadMotionModule": [("motion_module", "animatediff_models")],
                 "MV4D_LoadCameraCtrl": [("cameractrl", "animatediff_models")], "MV4D_LoadCVDModule": [("cvd_module", "animatediff_models")],
                 "MV4D_Load4DM": [("fourdm", "animatediff_models"), ("base_ckpt", "checkpoints")]}

# The frontend's own arrangement of the API prompt: where each node goes and how large it is.
LAYOUT = """(async (api, name) => {
    await app.loadApiJson(api, name);
    return Object.fromEntries(app.graph.nodes.map(node => [String(node.id), {pos: Array.from(node.pos), size: Array.from(node.size)}]));
})(%s, %s)"""

SHOW = "(async (workflow, name) => { await app.loadGraphData(workflow, true, true, name); return true; })(%s, %s)"

# The graph's bounds in screenshot pixels (after the view is fitted), to crop the thumbnail to the graph.
GRAPH_BOUNDS = """(() => {
    const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
    let box = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of app.graph.nodes) {
        const [x, y] = node.pos, [w, h] = node.size;
        box = [Math.min(box[0], x), Math.min(box[1], y - LiteGraph.NODE_TITLE_HEIGHT), Math.max(box[2], x + w), Math.max(box[3], y + h)];
    }
    const toScreen = (x, y) => [rect.left + (x + ds.offset[0]) * ds.scale, rect.top + (y + ds.offset[1]) * ds.scale];
    return [...toScreen(box[0], box[1]), ...toScreen(box[2], box[3])].map(v => v * window.devicePixelRatio);
})()"""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_SIZE, NOTE_GAP = (440, 240), 30
THUMBNAIL_WIDTH = 640


def model_metadata(api: dict) -> dict[str, list[dict]]:
    metadata = {}
    for node_id, node in api.items():
        files = [(node["inputs"][name_input], directory) for name_input, directory in LOADER_INPUTS.get(node["class_type"], [])]
        listed = [{"name": name, "url": MODEL_PAGES[name], "directory": directory} for name, directory in files if name in MODEL_PAGES]
        if listed:  # files without a direct download (4dm.ckpt) are named in the template's note instead
            metadata[node_id] = listed
    return metadata


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def unused_value(spec: list):
    """What a linked widget keeps (the frontend stores a value for it; the prompt uses the link)."""
    options = spec[1] if len(spec) > 1 else {}
    if isinstance(spec[0], list):
        return spec[0][0]
    if "default" in options:
        return options["default"]
    return options.get("options", [None])[0] if spec[0] == "COMBO" else None


def api_to_ui(name: str, api: dict, object_info: dict, layout: dict, notes: list[str], models: dict) -> dict:
    """The UI-format template of an API prompt (the inverse of the frontend's graph-to-prompt for our graphs):
    widget values in input order (a 'fixed' after each control_after_generate widget), linked widgets as inputs."""
    order = {node_id: index for index, node_id in enumerate(api)}
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        inputs, values = [], []
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                value = node["inputs"].get(name)
                linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                if linked:
                    link_id = len(links) + 1
                    links.append([link_id, int(value[0]), value[1], int(node_id), len(inputs), spec[0] if isinstance(spec[0], str) else "COMBO"])
                    outgoing.setdefault((value[0], value[1]), []).append(link_id)
                    inputs.append({"name": name, "type": links[-1][5], "link": link_id, **({"widget": {"name": name}} if is_widget(spec) else {})})
                if is_widget(spec):
                    values.append(unused_value(spec) if linked or value is None else value)
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        values.append("fixed")
        properties = {"Node name for S&R": node["class_type"], **({"models": models[node_id]} if node_id in models else {})}
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": layout[node_id]["pos"], "size": layout[node_id]["size"],
                      "flags": {}, "order": order[node_id], "mode": 0, "inputs": inputs,
                      "outputs": [{"name": name, "type": kind, "links": []} for name, kind in zip(info["output_name"], info["output"])],
                      "properties": properties, "widgets_values": values, "title": node["_meta"]["title"]})
    for node in nodes:
        for slot, output in enumerate(node["outputs"]):
            output["links"] = outgoing.get((str(node["id"]), slot), [])
    top = min(node["pos"][1] for node in nodes) - NOTE_SIZE[1] - 60
    left = min(node["pos"][0] for node in nodes)
    first_note = max(node["id"] for node in nodes) + 100
    for index, text in enumerate(notes):
        nodes.append({"id": first_note + index, "type": "MarkdownNote", "pos": [left + index * (NOTE_SIZE[0] + NOTE_GAP), top],
                      "size": list(NOTE_SIZE), "flags": {}, "order": len(api) + index, "mode": 0, "inputs": [], "outputs": [],
                      "title": "Note", "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mv4d/workflows/{name}")), "revision": 0,
            "last_node_id": max(node["id"] for node in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.45, "offset": [40, 40]}}, "version": 0.4,
            "models": [model for listed in models.values() for model in listed]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="template names (workflows/api/<name>.json)")
    args = parser.parse_args(argv)
    from conftest import HOST  # tests/host/conftest.py
    from mv4d_browser import Chromium, ComfyFrontend, find_chromium, js
    from mv4d_host_helpers import WORKFLOWS, get_json, start_test_server
    from PIL import Image

    if HOST is None or find_chromium() is None:
        print("needs a ComfyUI host ($COMFYUI_DIR or ~/ComfyUI) and Chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as base:
        server = start_test_server(HOST, Path(base))
        try:
            object_info = get_json(server.url + "/object_info")
            with Chromium(find_chromium()) as browser:
                frontend = ComfyFrontend(browser, server.url, "MV4D_OrbitCameras")
                for name in args.names:
                    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
                    frontend.open()
                    browser.evaluate("app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
                    layout = browser.evaluate(LAYOUT % (js(api), js(name)), timeout=120)
                    workflow = api_to_ui(name, api, object_info, layout, NOTES.get(name, []), model_metadata(api))
                    (WORKFLOWS / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
                    browser.evaluate(SHOW % (js(workflow), js(name)), timeout=120)
                    frontend.settle()
                    frontend.close_dialogs()
                    frontend.fit_view()
                    bounds = browser.evaluate(GRAPH_BOUNDS)
                    picture = Image.open(browser.screenshot(Path(base) / f"{name}.png")).convert("RGB")
                    margin = 12
                    picture = picture.crop((max(0, int(bounds[0]) - margin), max(0, int(bounds[1]) - margin),
                                            min(picture.width, int(bounds[2]) + margin), min(picture.height, int(bounds[3]) + margin)))
                    height = round(picture.height * THUMBNAIL_WIDTH / picture.width)
                    picture.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(WORKFLOWS / f"{name}.jpg", quality=85)
                    print(f"wrote workflows/{name}.json and workflows/{name}.jpg")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
