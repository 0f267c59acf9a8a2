"""Our nodes in a real ComfyUI process against what a careless or hostile user can give them (issue 12): links
and link loops in input/ and output/, names that cannot be written, NaN in float boxes, empty lists, files with
thousands of frame times, sizes that do not fit in memory, and Cancel during long loops."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_limits import memory_limit, time_limit
from test_host_nodes import POSE_LINE
from test_host_splats import FIT, RENDER

from mv4d.kernels import memory
from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.splats.model import MotionConfig, Splats4D, new_gaussians
from mv4d.kernels.splats.splatv import write_splatv
from mv4d.kernels.splats.storage import save_splats4d


@pytest.fixture
def folders(comfy, tmp_path):
    """input/hostile and output/hostile, removed afterwards, and a folder outside both."""
    made = [Path(comfy.get_input_directory()) / "hostile", Path(comfy.get_output_directory()) / "hostile"]
    for folder in made:
        folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    yield made[0], made[1], outside
    for folder in made:
        shutil.rmtree(folder)


def write_views(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (40 * index, 10, 200)).save(folder / name)


def test_one_reading_rule_for_every_loader_links_and_loops_included(mv4d_nodes, folders):
    """Item 7: a link loop hung the listings (every file listed 41 times); item 17: Load Multiview Images read
    linked files from outside input/, Load Camera Trajectory refused them, Load 4D listed linked files it then
    refused. Now: listed if and only if readable, readable if and only if the real path is inside the folder."""
    from mv4d.nodes.cameras import LoadCameraTrajectory
    from mv4d.nodes.load_multiview import LoadMultiviewImages, multiview_folders
    from mv4d.nodes.splats import Load4D, loadable_files

    inputs, outputs, outside = folders
    (inputs / "poses").mkdir()
    (inputs / "poses" / "real.txt").write_text(f"url\n{POSE_LINE}\n")
    (outside / "secret.txt").write_text(f"url\n{POSE_LINE}\n")
    (inputs / "poses" / "inside_link.txt").symlink_to(inputs / "poses" / "real.txt")
    (inputs / "poses" / "outside_link.txt").symlink_to(outside / "secret.txt")
    (inputs / "poses" / "._real.txt").write_text("AppleDouble junk")
    (inputs / "poses" / "loop").symlink_to(inputs, target_is_directory=True)  # input/hostile/poses/loop -> input/hostile
    gaussians = new_gaussians(torch.zeros(3, 3), torch.rand(3, 3), torch.full((3,), 0.1), MotionConfig(sh_degree=0, fourier_terms=0))
    write_splatv(outputs / "scene.splatv", gaussians)
    write_splatv(outside / "elsewhere.splatv", gaussians)
    (outputs / "linked.splatv").symlink_to(outside / "elsewhere.splatv")
    (outputs / "loop").symlink_to(outputs, target_is_directory=True)
    write_views(inputs / "set", ["view_0.png", "view_1.png", "._view_2.png"])
    write_views(outside / "views", ["stolen.png"])
    (inputs / "set" / "view_3.png").symlink_to(outside / "views" / "stolen.png")

    with time_limit(20, "listing input/ and output/ with link loops"):
        poses = LoadCameraTrajectory.GET_SCHEMA().inputs[0].options
        scenes = loadable_files()
        sets = multiview_folders()
    assert [name for name in poses if name.startswith("hostile/")] == ["hostile/poses/inside_link.txt", "hostile/poses/real.txt"]
    assert [name for name in scenes if name.startswith("hostile/")] == ["hostile/scene.splatv [output]"]
    assert "hostile/set" in sets and not any("loop" in name for name in poses + scenes + sets)

    assert LoadCameraTrajectory.validate_inputs("hostile/poses/inside_link.txt") is True
    refused = LoadCameraTrajectory.validate_inputs("hostile/poses/outside_link.txt")
    assert refused == ("MV4D Load Camera Trajectory: input 'pose_file': 'hostile/poses/outside_link.txt' is a link to somewhere "
                       "outside the input folder. Fix: copy the file itself into the input folder")
    assert "'hostile/poses/._real.txt' is a hidden file" in LoadCameraTrajectory.validate_inputs("hostile/poses/._real.txt")
    assert "is a link to somewhere outside the output folder" in Load4D.validate_inputs("hostile/linked.splatv [output]")
    assert "points outside the input folder" in LoadCameraTrajectory.validate_inputs("hostile/poses/loop/../../../../x.txt")

    views, _, count = run_node(LoadMultiviewImages, folder="hostile/set", size=0, input_view="first").args
    assert count == 2 and views.shape[0] == 2  # neither the ._ file nor the link to outside was read


def test_an_empty_list_is_a_clear_error_not_a_type_error(mv4d_nodes):
    """Item 16: with no pose file in input/, validation raised a raw TypeError (the frontend sends null)."""
    from mv4d.nodes.cameras import LoadCameraTrajectory
    from mv4d.nodes.load_multiview import LoadMultiviewImages
    from mv4d.nodes.splats import Load4D

    message = LoadCameraTrajectory.validate_inputs(None)
    assert message.startswith("MV4D Load Camera Trajectory: input 'pose_file': no file chosen (None)")
    assert "Fix: put a .txt pose file into the input folder and refresh the node list (R)" in message
    assert "no file chosen" in Load4D.validate_inputs(None) and "no file chosen" in Load4D.validate_inputs("")
    assert "no folder chosen" in LoadMultiviewImages.validate_inputs(None)


@pytest.mark.parametrize("prefix, problem", [
    ("", "is empty"),
    ("mv4d/", "has an empty folder or file name"),
    ("a//b", "has an empty folder or file name"),
    ("mv4d/.hidden", "starts with '.': the files would be hidden"),
    ("bad\0name", "holds characters file systems refuse"),
    ("what?", "holds characters file systems refuse"),
    ("x" * 300, "is 300 bytes long"),
    ("hostile/afile/sub", "'hostile/afile' is a file in the output folder"),
    ("../escape", "points outside the output folder"),
])
def test_save_4d_refuses_a_prefix_it_cannot_write_before_the_prompt_runs(mv4d_nodes, folders, prefix, problem):
    """Item 15: these gave raw OS errors, and only at execution ('' wrote hidden ._00001_.* files)."""
    from mv4d.nodes.splats import Save4D

    (folders[1] / "afile").write_text("in the way")
    message = Save4D.validate_inputs(prefix)
    assert message is not True and message.startswith("MV4D Save 4D: input 'filename_prefix': ") and problem in message, message
    assert Save4D.validate_inputs("hostile/scene") is True


def test_nan_in_a_float_box_names_that_box(mv4d_nodes):
    """Item 16: Render 4D fps NaN crashed; Fit 4D densify_until NaN blamed densify."""
    from mv4d.integration.node_errors import NodeInputError

    rig = run_node(mv4d_nodes.OrbitCameras, views=3, elevation=10.0, radius=2.0, fov=33.8, width=16, height=16,
                   start_azimuth=0.0, order="input view first").args[0]
    video = run_node(mv4d_nodes.ExampleScene, cameras=rig, frames=2, perturbation=0.0, perturbation_seed=0).args[0]
    scene = Splats4D(new_gaussians(torch.zeros(3, 3), torch.rand(3, 3), torch.full((3,), 0.1), MotionConfig()), video.times)
    with pytest.raises(NodeInputError, match=r"^MV4D Render 4D: input 'fps': nan is not a number\. Fix: type a finite value"):
        run_node(mv4d_nodes.Render4D, splats_4d=scene, **(RENDER | {"fps": math.nan}))
    with pytest.raises(NodeInputError, match=r"^MV4D Fit 4D Gaussians: input 'densify_until': nan is not a number"):
        run_node(mv4d_nodes.Fit4DGaussians, multiview_video=video, **(FIT | {"densify_until": math.nan}))
    with pytest.raises(NodeInputError, match=r"^MV4D Orbit Cameras: input 'radius': inf is not a number"):
        run_node(mv4d_nodes.OrbitCameras, views=3, elevation=10.0, radius=math.inf, fov=33.8, width=16, height=16,
                 start_azimuth=0.0, order="input view first")
    with pytest.raises(NodeInputError, match=r"^MV4D Fit 4D Gaussians: input 'densify_until': must lie in \[0, 1\], got 2\.0"):
        run_node(mv4d_nodes.Fit4DGaussians, multiview_video=video, **(FIT | {"densify_until": 2.0}))


def test_load_4d_of_fifty_thousand_frame_times_costs_nothing_until_its_splat_frames_are_read(mv4d_nodes, folders, monkeypatch):
    """Item 11: the per-frame core SPLAT output was built on loading, whether used or not (50,000 frame times:
    a 12 GB allocation). Now it is built when a node first reads it, after a memory check."""
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.nodes.splats import CORE_SPLAT, Load4D

    gaussians = new_gaussians(torch.rand(2000, 3), torch.rand(2000, 3), torch.full((2000,), 0.02), MotionConfig())
    save_splats4d(folders[1] / "long.mv4d.safetensors", Splats4D(gaussians, torch.linspace(0, 1, 50_000), orbit_rig(2, height=16, width=16)))
    with memory_limit(256 * 2**20):  # building every frame would take 50,000 x 2,000 x 23 floats = 9.2 GB
        outputs = run_node(Load4D, file="hostile/long.mv4d.safetensors [output]").args
    assert len(outputs[0].frame_times) == 50_000 and outputs[0].gaussians.count == 2000
    if CORE_SPLAT is None:
        assert len(outputs) == 1  # hosts before 0.29 have no core SPLAT type
        return
    splat = outputs[1]
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**30)
    with pytest.raises(NodeInputError, match=r"^MV4D Load 4D: output 'splat_frames': the scene at each of its 50000 frame times "
                                             r"\(2000 Gaussians\) needs about 6\.0 GiB, more than the 1\.0 GiB this machine has free"):
        splat.positions  # noqa: B018 - reading the field builds it
    save_splats4d(folders[1] / "short.mv4d.safetensors", Splats4D(gaussians, torch.linspace(0, 1, 4), None))
    short = run_node(Load4D, file="hostile/short.mv4d.safetensors [output]").args[1]
    assert short.positions.shape == (4, 2000, 3) and short.sh.shape == (4, 2000, 4, 3) and short.counts is None


def test_cancel_stops_the_example_scene_at_the_next_image(mv4d_nodes):
    """Item 12: an interrupt at 120 s ended the prompt at 187 s."""
    import comfy.model_management as model_management

    rig = run_node(mv4d_nodes.OrbitCameras, views=4, elevation=10.0, radius=2.0, fov=33.8, width=16, height=16,
                   start_azimuth=0.0, order="input view first").args[0]
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            run_node(mv4d_nodes.ExampleScene, cameras=rig, frames=1000, perturbation=1.0, perturbation_seed=0)
    finally:
        model_management.interrupt_current_processing(False)


def test_sizes_that_do_not_fit_are_refused_with_the_bound_and_the_fix(mv4d_nodes, folders, monkeypatch):
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.nodes.load_multiview import LoadMultiviewImages

    write_views(folders[0] / "big", ["a.png", "b.png"])
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**20)
    with pytest.raises(NodeInputError, match=r"^MV4D Load Multiview Images: input 'size': 2 views at 4096 px needs about 768\.0 MiB, "
                                             r"more than the 1\.0 MiB this machine has free\. Fix: lower size"):
        run_node(LoadMultiviewImages, folder="hostile/big", size=4096, input_view="first")
    rig = orbit_rig(300, height=16, width=16)
    with pytest.raises(NodeInputError, match=r"^MV4D Epipolar Mask: input 'cameras': the masks of 89700 ordered pairs"):
        run_node(mv4d_nodes.EpipolarMask, cameras=rig, latent_width=8, latent_height=8, mode="hard", tau=3.0,
                 reference_resolution=256, band_fraction=0.0234, decay=3.0, slope_seed=0)


def test_a_dot_dot_after_a_link_is_judged_where_the_link_leads(mv4d_nodes, folders):
    """'link/../x' opens x beside the link's target, not beside the link: a path is judged as the OS opens it."""
    from mv4d.integration import host
    from mv4d.nodes.cameras import LoadCameraTrajectory

    inputs, outputs, outside = folders
    (outside / "deeper").mkdir()
    (outside / "secret.txt").write_text(f"url\n{POSE_LINE}\n")
    (inputs / "out").symlink_to(outside / "deeper", target_is_directory=True)
    (outputs / "out").symlink_to(outside / "deeper", target_is_directory=True)
    assert "is a link to somewhere outside the input folder" in LoadCameraTrajectory.validate_inputs("hostile/out/../secret.txt")
    with pytest.raises(ValueError, match="is a link to somewhere outside the output folder"):
        host.check_prefix("hostile/out/../escaped")
    assert not list(outside.glob("escaped*"))
