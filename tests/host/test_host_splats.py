"""The multi-view video and 4D Gaussian nodes inside a real ComfyUI process."""

from pathlib import Path

import pytest
import torch

from mv4d_host_helpers import run_node

FIT = dict(iterations=40, resolution=0, views_per_step=2, initial_gaussians=300, max_gaussians=5000, densify=True,
           densify_until=0.6, grow_threshold=0.0002, position_degree=3, fourier_terms=2, rotation_degree=1,
           temporal_opacity=True, sh_degree=1, loss="L1 + D-SSIM", lpips_weight=0.0, background="white", fit_seed=0)
RENDER = dict(mode="turntable", frames=4, width=32, height=32, elevation=10.0, radius=2.0, fov=33.8, turns=1.0,
              background="white", fps=12.0)


@pytest.fixture(scope="module")
def example(mv4d_nodes):
    rig = run_node(mv4d_nodes.OrbitCameras, views=4, elevation=10.0, radius=2.0, fov=33.8, width=32, height=32,
                   start_azimuth=0.0, order="SV3D: input view last (360 deg)").args[0]
    return run_node(mv4d_nodes.ExampleScene, cameras=rig, frames=3, perturbation=1.0, perturbation_seed=0).args[0]


@pytest.fixture(scope="module")
def fitted(mv4d_nodes, example):
    return run_node(mv4d_nodes.Fit4DGaussians, multiview_video=example, **FIT)


def test_fit_gives_4d_gaussians_and_core_splat_frames_where_the_host_has_them(mv4d_nodes, fitted):
    from comfy_api.latest import io

    scene = fitted.args[0]
    assert scene.gaussians.device.type == "cpu" and len(scene.frame_times) == 3 and scene.cameras is not None
    outputs = [output.id for output in mv4d_nodes.Fit4DGaussians.GET_SCHEMA().outputs]
    if hasattr(io, "Splat"):  # ComfyUI 0.29+
        assert outputs == ["splats_4d", "splat_frames"]
        splat = fitted.args[1]
        count = scene.gaussians.count
        assert splat.positions.shape == (3, count, 3) and splat.rotations.shape == (3, count, 4)
        assert splat.opacities.shape == (3, count, 1) and splat.sh.shape == (3, count, 4, 3)
        assert torch.allclose(splat.positions[1], scene.gaussians.positions(scene.frame_times)[1])
    else:
        assert outputs == ["splats_4d"] and len(fitted.args) == 1


def test_core_splat_nodes_take_our_frames(mv4d_nodes, fitted):
    from comfy_api.latest import io

    if not hasattr(io, "Splat"):
        pytest.skip("this ComfyUI has no core SPLAT type (added in 0.29)")
    from comfy_extras.nodes_gaussian_splat import File3DToSplat, SplatToFile3D

    splat = fitted.args[1]
    frame_one = type(splat)(splat.positions[1:2], splat.scales[1:2], splat.rotations[1:2], splat.opacities[1:2], splat.sh[1:2])
    ply = run_node(SplatToFile3D, splat=frame_one, format="ply").args[0]
    back = run_node(File3DToSplat, model_3d=ply).args[0]
    assert torch.allclose(back.positions[0], splat.positions[1], atol=1e-5)
    assert torch.allclose(back.opacities[0], splat.opacities[1], atol=1e-4)


def test_render_turntable_and_cameras_by_frames(mv4d_nodes, fitted):
    scene = fitted.args[0]
    turntable = run_node(mv4d_nodes.Render4D, splats_4d=scene, **RENDER)
    assert turntable.args[0].shape == (4, 32, 32, 3)
    preview = turntable.ui.as_dict()
    assert preview["images"][0]["filename"].endswith(".webp") and preview["animated"] == (True,)
    grid = run_node(mv4d_nodes.Render4D, splats_4d=scene, **(RENDER | {"mode": "cameras x frames", "frames": 0}))
    assert grid.args[0].shape == (4 * 3, 32, 32, 3)


def test_save_then_load_both_formats(comfy, mv4d_nodes, fitted):
    scene = fitted.args[0]
    saved = run_node(mv4d_nodes.Save4D, splats_4d=scene, filename_prefix="mv4d_tests/scene", splatv=True,
                     ply_sequence=True, static_ply=True, static_time=0.25).ui
    output = Path(comfy.get_output_directory())
    files = [output / item["subfolder"] / item["filename"] for item in saved["files"]]
    assert len(files) == 1 + 2 + 3 + 1 and all(path.is_file() and path.stat().st_size > 0 for path in files)
    assert not list(output.rglob("*.partial-*"))
    options = mv4d_nodes.Load4D.GET_SCHEMA().inputs[0].options
    lossless = next(o for o in options if o.startswith("mv4d_tests/scene") and ".mv4d.safetensors" in o)
    loaded = run_node(mv4d_nodes.Load4D, file=lossless).args[0]
    assert all(torch.equal(loaded.gaussians.params[k], v) for k, v in scene.gaussians.params.items())
    web = next(o for o in options if o.startswith("mv4d_tests/scene") and o.split(" [")[0].endswith(".splatv"))
    assert run_node(mv4d_nodes.Load4D, file=web).args[0].gaussians.count == scene.gaussians.count
    assert mv4d_nodes.Load4D.validate_inputs(file="../../x.splatv [output]") != True  # noqa: E712


def test_4d_node_errors_name_node_input_and_fix(comfy, mv4d_nodes, example, fitted):
    from mv4d.integration.node_errors import NodeInputError

    with pytest.raises(NodeInputError, match=r"MV4D Save 4D: input 'filename_prefix': '../outside' points outside the output folder"):
        run_node(mv4d_nodes.Save4D, splats_4d=fitted.args[0], filename_prefix="../outside", splatv=True,
                 ply_sequence=False, static_ply=False, static_time=0.5)
    with pytest.raises(NodeInputError, match=r"MV4D Images To Multiview Video: input 'cameras': 4 cameras but the batch holds 2 views"):
        run_node(mv4d_nodes.ImagesToMultiviewVideo, images=torch.rand(6, 16, 16, 3), cameras=example.cameras, frames=3)
    blank = type(example)(torch.full_like(example.images, 0.7), example.cameras, example.times)
    with pytest.raises(NodeInputError, match=r"MV4D Fit 4D Gaussians: input 'multiview_video': every pixel has the same value"):
        run_node(mv4d_nodes.Fit4DGaussians, multiview_video=blank, **FIT)
    with pytest.raises(NodeInputError, match=r"input 'lpips_weight': LPIPS needs weights.*ComfyUI/models/lpips"):
        run_node(mv4d_nodes.Fit4DGaussians, multiview_video=example, **(FIT | {"lpips_weight": 0.5}))


def test_cancel_stops_a_fit_at_the_next_step(mv4d_nodes, example):
    import comfy.model_management as model_management

    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            run_node(mv4d_nodes.Fit4DGaussians, multiview_video=example, **(FIT | {"iterations": 100000}))
    finally:
        model_management.interrupt_current_processing(False)


def test_multiview_video_round_trips_through_image_batches(mv4d_nodes, example):
    images, cameras, frames = run_node(mv4d_nodes.MultiviewVideoToImages, multiview_video=example).args
    assert images.shape == (4 * 3, 32, 32, 3) and frames == 3
    back = run_node(mv4d_nodes.ImagesToMultiviewVideo, images=images, cameras=cameras, frames=frames).args[0]
    assert torch.equal(back.images, example.images)


def test_lpips_weights_in_the_models_folder_are_found_and_used(comfy, mv4d_nodes, example, tmp_path):
    """No LPIPS weights can be downloaded here: random ones in the real files' layouts stand in for them."""
    from safetensors.torch import save_file

    from mv4d.kernels.splats.losses import _CHANNELS, LPIPS

    backbone = {f"features.{k}": torch.randn(v.shape) * 0.05 for k, v in LPIPS().features.state_dict().items()}
    torch.save(backbone, tmp_path / "vgg16-397923af.pth")
    save_file({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_CHANNELS)}, str(tmp_path / "vgg.safetensors"))
    save_file({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_CHANNELS)}, str(tmp_path / "lpips_vgg.safetensors"))
    comfy.add_model_folder_path("lpips", str(tmp_path))
    try:
        scene = run_node(mv4d_nodes.Fit4DGaussians, multiview_video=example,
                         **(FIT | {"iterations": 5, "lpips_weight": 0.5, "loss": "confidence-weighted D-SSIM (Diffusion²)"})).args[0]
        assert scene.gaussians.count > 0
    finally:
        comfy.folder_names_and_paths["lpips"][0].remove(str(tmp_path))
