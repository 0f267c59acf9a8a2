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
# loader node -> {widget index: the folder of the file it names}
LOADERS = {"ImageOnlyCheckpointLoader": {0: "checkpoints"}, "MV4D_LoadMultiviewModel": {0: "checkpoints"},
           "CheckpointLoaderSimple": {0: "checkpoints"}, "MV4D_LoadMotionModule": {0: "animatediff_models"},
           "MV4D_LoadCameraCtrl": {0: "animatediff_models"}, "MV4D_Load4DM": {0: "animatediff_models", 1: "checkpoints"}}
# 4Diffusion shares 4dm.ckpt in a Google Drive folder, with no direct address for the frontend: the note names it
NO_DIRECT_DOWNLOAD = {"4dm.ckpt"}


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def test_the_pipeline_templates_are_all_there():
    assert set(TO_4D + ["epipolar_mask_preview", "text_to_3d_mvdream", "image_to_3d_imagedream", "text_to_video_animatediff",
                        "text_to_video_cameractrl", "vividzoo_text_to_4d", "vividzoo_train_adapters", "video_to_multiview_4dm",
                        "video_to_4d_4diffusion"]) <= set(TEMPLATES)


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
def test_loaders_carry_model_metadata_matching_the_files_they_load(name):
    workflow = ui(name)
    named = []
    for node in workflow["nodes"]:
        files = {node["widgets_values"][index]: folder for index, folder in LOADERS.get(node["type"], {}).items()}
        downloadable = {file: folder for file, folder in files.items() if file not in NO_DIRECT_DOWNLOAD}
        listed = node["properties"].get("models", [])
        assert sorted(model["name"] for model in listed) == sorted(downloadable), node["type"]
        for model in listed:
            assert model["directory"] == downloadable[model["name"]]
            assert model["url"].startswith(CHECKPOINT_PAGES[model["name"]]) and model["url"].endswith(model["name"])
        named += list(downloadable)
        if set(files) & NO_DIRECT_DOWNLOAD:  # the note says where the file comes from
            notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote"))
            assert all(file in notes for file in set(files) & NO_DIRECT_DOWNLOAD) and "aejion/4Diffusion" in notes
    assert sorted(m["name"] for m in workflow.get("models", [])) == sorted(named)


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


def test_the_4diffusion_templates_go_from_loadvideo_through_4dm_to_the_refined_gaussians():
    for name in ("video_to_multiview_4dm", "video_to_4d_4diffusion"):
        graph = api(name)
        by_kind = {node["class_type"]: (key, node) for key, node in graph.items()}
        boxes = {node["_meta"]["title"]: node["inputs"]["value"] for node in graph.values() if node["class_type"] == "PrimitiveInt"}
        assert {key: boxes[key] for key in ("views", "frames", "size")} == {"views": 4, "frames": 8, "size": 256}  # 4DM's setting
        load_video, components = by_kind["LoadVideo"][0], by_kind["GetVideoComponents"]
        assert components[1]["inputs"]["video"] == [load_video, 0]
        conditioning_key, conditioning = by_kind["MV4D_4DMConditioning"]
        assert conditioning["inputs"]["video"] == [components[0], 0]
        sampler = by_kind["KSampler"][1]["inputs"]
        assert sampler["cfg"] == 5.0 and sampler["latent_image"] == [conditioning_key, 2]
    refine_key, refine = by_kind["MV4D_Refine4DWithSDS"]
    inputs = refine["inputs"]
    assert inputs["splats_4d"] == [by_kind["MV4D_Fit4DGaussians"][0], 0]
    assert [inputs[name] for name in ("positive", "negative", "cameras", "anchor_video")] == [[conditioning_key, slot] for slot in (0, 1, 3, 4)]
    assert (inputs["guidance_scale"], inputs["anchor_ssim_weight"], inputs["window_frames"]) == (5.0, 100.0, 8)  # 4Diffusion's
    for kind in ("MV4D_Render4D", "MV4D_Save4D"):
        assert by_kind[kind][1]["inputs"]["splats_4d"] == [refine_key, 0]
    assert by_kind["MV4D_Save4D"][1]["inputs"]["splatv"]
