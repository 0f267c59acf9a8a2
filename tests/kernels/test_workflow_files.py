"""The shipped templates as files: each UI template has an API twin and a thumbnail, loaders carry ComfyUI's model
metadata, and the X -> 4D graphs default to the paper's setting with a note for smaller GPUs. (That they load in the
real frontend and run through a server is the host lane's job.)"""

import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
TEMPLATES = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
TO_4D = ["image_to_4d", "video_to_4d", "multiview_to_4d"]
PAPER = {"views": 21, "frames": 25, "size": 576, "steps": 50}
CHECKPOINT_PAGES = {"svd_xt.safetensors": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt/",
                    "sv3d_p.safetensors": "https://huggingface.co/stabilityai/sv3d/",
                    "sd-v2.1-base-4view.pt": "https://huggingface.co/MVDream/MVDream/",
                    "sd-v1.5-4view.pt": "https://huggingface.co/MVDream/MVDream/",
                    "sd-v2.1-base-4view-ipmv.pt": "https://huggingface.co/Peng-Wang/ImageDream/",
                    "v1-5-pruned-emaonly-fp16.safetensors": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/",
                    "v3_sd15_mm.ckpt": "https://huggingface.co/guoyww/animatediff/",
                    "mm_sd_v15_v2.ckpt": "https://huggingface.co/guoyww/animatediff/",
                    "CameraCtrl.ckpt": "https://huggingface.co/hehao13/CameraCtrl/"}
# loader node -> the folder of the file its first widget names
LOADERS = {"ImageOnlyCheckpointLoader": "checkpoints", "MV4D_LoadMultiviewModel": "checkpoints", "CheckpointLoaderSimple": "checkpoints",
           "MV4D_LoadMotionModule": "animatediff_models", "MV4D_LoadCameraCtrl": "animatediff_models"}


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def test_the_pipeline_templates_are_all_there():
    assert set(TO_4D + ["epipolar_mask_preview", "text_to_3d_mvdream", "image_to_3d_imagedream", "text_to_video_animatediff",
                        "text_to_video_cameractrl", "vividzoo_text_to_4d", "vividzoo_train_adapters"]) <= set(TEMPLATES)


@pytest.mark.parametrize("name", ["text_to_3d_mvdream", "image_to_3d_imagedream"])
def test_multiview_templates_fit_static_gaussians_with_a_note_for_smaller_gpus(name):
    fit = next(node for node in api(name).values() if node["class_type"] == "MV4D_Fit4DGaussians")["inputs"]
    assert (fit["position_degree"], fit["fourier_terms"], fit["rotation_degree"], fit["temporal_opacity"]) == (0, 0, 0, False)
    save = next(node for node in api(name).values() if node["class_type"] == "MV4D_Save4D")["inputs"]
    assert save["static_ply"]
    notes = [node["widgets_values"][0] for node in ui(name)["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert any("Smaller GPUs" in note for note in notes) and any("models/checkpoints" in note for note in notes)


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_has_an_api_twin_and_a_jpeg_thumbnail(name):
    assert (WORKFLOWS / "api" / f"{name}.json").is_file()
    thumbnail = (WORKFLOWS / f"{name}.jpg").read_bytes()  # the name the template browser asks for
    assert thumbnail[:3] == b"\xff\xd8\xff" and len(thumbnail) > 2000


@pytest.mark.parametrize("name", TEMPLATES)
def test_loaders_carry_model_metadata_matching_the_file_they_load(name):
    workflow = ui(name)
    loaders = [node for node in workflow["nodes"] if node["type"] in LOADERS]
    for node in loaders:
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0] and model["directory"] == LOADERS[node["type"]]
        assert model["url"].startswith(CHECKPOINT_PAGES[model["name"]]) and model["url"].endswith(model["name"])
    assert sorted(m["name"] for m in workflow.get("models", [])) == sorted(n["widgets_values"][0] for n in loaders)


@pytest.mark.parametrize("name", TO_4D)
def test_x_to_4d_defaults_follow_the_paper_with_a_note_for_smaller_gpus(name):
    boxes = {node["_meta"]["title"]: node["inputs"]["value"] for node in api(name).values() if node["class_type"] == "PrimitiveInt"}
    assert {key: boxes[key] for key in PAPER if key in boxes} == {key: value for key, value in PAPER.items() if key in boxes}
    assert {"frames", "size", "steps", "seed"} <= set(boxes)
    fit = next(node for node in api(name).values() if node["class_type"] == "MV4D_Fit4DGaussians")
    assert fit["inputs"]["iterations"] == 5000
    notes = [node["widgets_values"][0] for node in ui(name)["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert any("Smaller GPUs" in note and "videos_per_call" in note for note in notes)
    kinds = {node["class_type"] for node in api(name).values()}
    assert {"MV4D_ComposedGuider", "MV4D_Fit4DGaussians", "MV4D_Render4D", "MV4D_Save4D"} <= kinds


def test_the_3d_aware_template_samples_through_the_aware_guider_and_saves_its_reconstruction():
    graph = api("image_to_4d_3d_aware")
    by_kind = {node["class_type"]: (key, node) for key, node in graph.items()}
    aware_key, aware = by_kind["MV4D_3DAwareDenoising"]
    assert aware["inputs"]["guider"] == [by_kind["MV4D_ComposedGuider"][0], 0]
    assert aware["inputs"]["steps"] == "20, 30, 40" and aware["inputs"]["blend_weight"] == 1.0  # VideoMV
    assert by_kind["SamplerCustomAdvanced"][1]["inputs"]["guider"] == [aware_key, 0]
    reconstruction_key, reconstruction = by_kind["MV4D_3DAwareReconstruction"]
    assert reconstruction["inputs"] == {"guider": [aware_key, 0], "latent": [by_kind["SamplerCustomAdvanced"][0], 0]}
    for kind in ("MV4D_Render4D", "MV4D_Save4D"):
        assert by_kind[kind][1]["inputs"]["splats_4d"] == [reconstruction_key, 0]
    assert "MV4D_Fit4DGaussians" not in by_kind  # the reconstruction replaces the separate fit
    boxes = {node["_meta"]["title"]: node["inputs"]["value"] for node in graph.values() if node["class_type"] == "PrimitiveInt"}
    assert {key: boxes[key] for key in PAPER} == PAPER
