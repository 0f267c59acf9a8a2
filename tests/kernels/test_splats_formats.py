"""Every exported file parses back to what was written, in the layout standard readers expect."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from plyfile import PlyData

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.files import inside
from mv4d.kernels.splats.export import export_scene, visible
from mv4d.kernels.splats.model import MotionConfig, Splats4D, new_gaussians
from mv4d.kernels.splats.ply import property_names, read_ply, write_ply
from mv4d.kernels.splats.splatv import MAGIC, TEXTURE_WIDTH, decode, read_splatv, write_splatv
from mv4d.kernels.splats.storage import load_splats4d, save_splats4d


def moving_gaussians(config: MotionConfig, count=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gaussians = new_gaussians(torch.randn(count, 3, generator=generator) * 0.3, torch.rand(count, 3, generator=generator),
                              0.01 + 0.05 * torch.rand(count, generator=generator), config, opacity=0.5)
    for name, value in gaussians.params.items():
        if name in ("position_motion", "rotation_motion", "shN"):
            gaussians.params[name] = torch.randn(value.shape, generator=generator) * 0.05
    gaussians.params["quats"] = torch.randn(count, 4, generator=generator)
    gaussians.params["opacities"] = torch.randn(count, generator=generator)
    if config.temporal_opacity:
        gaussians.params["opacity_center"] = torch.rand(count, generator=generator)
        gaussians.params["opacity_log_width"] = torch.log(0.1 + torch.rand(count, generator=generator))
    return gaussians


def test_ply_is_inria_layout_and_reads_back(tmp_path):
    frame = moving_gaussians(MotionConfig(sh_degree=2)).frame(0.3)
    write_ply(tmp_path / "frame.ply", frame)
    ply = PlyData.read(str(tmp_path / "frame.ply"))  # a standard reader
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == property_names(2)
    assert len(property_names(2)) == 9 + 3 * 8 + 1 + 3 + 4 and vertex.count == frame.count
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    assert np.allclose(np.stack([vertex["x"], vertex["y"], vertex["z"]], 1), frame.means.numpy(), atol=1e-7)
    opacity = frame.opacities.clamp(1e-6, 1 - 1e-6)
    assert np.allclose(vertex["opacity"], torch.log(opacity / (1 - opacity)).numpy(), atol=1e-5)
    assert np.allclose(vertex["scale_0"], frame.scales[:, 0].log().numpy(), atol=1e-6)
    assert np.allclose(vertex["f_rest_0"], frame.sh[:, 1, 0].numpy())  # channel-major: red coefficients first
    assert np.allclose(vertex["f_rest_8"], frame.sh[:, 1, 1].numpy())  # then green
    back = read_ply(tmp_path / "frame.ply")
    assert back.sh_degree == 2 and torch.allclose(back.sh, frame.sh) and torch.allclose(back.quats, frame.quats)


def test_splatv_header_records_and_exact_motion(tmp_path):
    config = MotionConfig(position_degree=3, fourier_terms=0, rotation_degree=1, temporal_opacity=True, sh_degree=0)
    gaussians = moving_gaussians(config, count=1500)
    cameras = orbit_rig(3, height=64, width=80)
    error = write_splatv(tmp_path / "scene.splatv", gaussians, cameras)
    assert error < 1e-5  # cubic positions and linear rotations map exactly
    data = (tmp_path / "scene.splatv").read_bytes()
    magic, length = struct.unpack("<II", data[:8])
    header = json.loads(data[8:8 + length])
    assert magic == MAGIC and header[0]["type"] == "splat" and header[0]["texwidth"] == TEXTURE_WIDTH
    assert header[0]["texheight"] == math.ceil(4 * 1500 / TEXTURE_WIDTH)
    assert len(data) == 8 + length + header[0]["size"] == 8 + length + TEXTURE_WIDTH * header[0]["texheight"] * 16
    assert len(header[0]["cameras"]) == 3 and header[0]["cameras"][0]["width"] == 80
    records, _ = decode(data)
    assert len(records.positions) == 1500
    back, _ = read_splatv(tmp_path / "scene.splatv")
    times = torch.tensor([0.0, 0.37, 0.8, 1.0])
    # within half-float quantisation of the stored fields
    assert (back.positions(times) - gaussians.positions(times)).abs().max() < 2e-3
    assert (back.rotations(times) - gaussians.rotations(times)).abs().max() < 2e-3
    assert (back.opacities(times) - gaussians.opacities(times)).abs().max() < 1 / 255 + 2e-3


def test_splatv_reports_the_error_of_approximating_fourier_motion(tmp_path):
    gaussians = moving_gaussians(MotionConfig(position_degree=1, fourier_terms=2, sh_degree=0))
    error = write_splatv(tmp_path / "fourier.splatv", gaussians)
    assert 0 < error < 0.5


def test_the_lossless_file_round_trips_exactly(tmp_path):
    gaussians = moving_gaussians(MotionConfig(sh_degree=1))
    scene = Splats4D(gaussians, torch.linspace(0, 1, 7), orbit_rig(4, height=32, width=48))
    save_splats4d(tmp_path / "scene.mv4d.safetensors", scene)
    back = load_splats4d(tmp_path / "scene.mv4d.safetensors")
    assert back.gaussians.config == gaussians.config
    assert all(torch.equal(back.gaussians.params[k], v) for k, v in gaussians.params.items())
    assert torch.equal(back.frame_times, scene.frame_times)
    assert torch.equal(back.cameras.world_to_camera, scene.cameras.world_to_camera) and back.cameras.width == 48
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInput, match="not a readable"):
        load_splats4d(tmp_path / "other.safetensors")


def test_export_writes_every_file_whole_and_leaves_nothing_half_written(tmp_path):
    scene = Splats4D(moving_gaussians(MotionConfig()), torch.linspace(0, 1, 5), None)
    saved = export_scene(scene, tmp_path / "scene_00001_", static_time=0.5)
    names = sorted(path.relative_to(tmp_path).as_posix() for path in saved.paths)
    assert names == sorted(["scene_00001_.mv4d.safetensors", "scene_00001_.splatv", "scene_00001_.html", "scene_00001__t0.500.ply"]
                           + [f"scene_00001__frames/frame_{i:04d}.ply" for i in range(5)])
    assert all(path.is_file() for path in saved.paths)
    for index, time in enumerate(scene.frame_times.tolist()):
        assert PlyData.read(str(tmp_path / f"scene_00001__frames/frame_{index:04d}.ply"))["vertex"].count == \
            visible(scene.gaussians.frame(time)).count

    class Stop(Exception):
        pass

    def stop_in_the_sequence(done, total):
        if done == 4:
            raise Stop
    with pytest.raises(Stop):  # an interrupt (or any error) half way through the set leaves none of it
        export_scene(scene, tmp_path / "scene_00002_", on_file=stop_in_the_sequence)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["scene_00001_.mv4d.safetensors", "scene_00001_.splatv",
                                                                       "scene_00001_.html", "scene_00001__t0.500.ply", "scene_00001__frames"])


def test_frames_where_no_gaussian_is_visible_save_as_empty_plys(tmp_path):
    """Issue 12, item 13: the .ply writer crashed on a frame with no visible Gaussian, after the other files of
    the set were written."""
    gaussians = moving_gaussians(MotionConfig(sh_degree=2))
    gaussians.params["opacity_center"] = torch.full((gaussians.count,), 0.0)  # all fade out long before t = 1
    gaussians.params["opacity_log_width"] = torch.full((gaussians.count,), math.log(0.05))
    scene = Splats4D(gaussians, torch.linspace(0, 1, 3), None)
    assert visible(gaussians.frame(1.0)).count == 0 < visible(gaussians.frame(0.0)).count
    saved = export_scene(scene, tmp_path / "empty_00001_", static_time=1.0)
    assert PlyData.read(str(tmp_path / "empty_00001__frames/frame_0002.ply"))["vertex"].count == 0
    back = read_ply(tmp_path / "empty_00001__t1.000.ply")
    assert back.means.shape == (0, 3) and back.sh.shape == (0, 9, 3) and back.sh_degree == 2
    assert all(path.is_file() for path in saved.paths)


def test_a_failing_member_leaves_none_of_the_set_behind(tmp_path, monkeypatch):
    """Issue 12, item 13: a failure while writing one file must not leave the files written before it."""
    from mv4d.kernels.splats import export

    def broken_ply(path, frame):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_ply", broken_ply)
    scene = Splats4D(moving_gaussians(MotionConfig()), torch.linspace(0, 1, 3), None)
    with pytest.raises(OSError, match="No space"):
        export_scene(scene, tmp_path / "scene_00001_")
    assert list(tmp_path.iterdir()) == []  # no .mv4d.safetensors, no .splatv, no staging folder


def test_writes_outside_the_output_folder_are_refused(tmp_path):
    assert inside(tmp_path, "mv4d/scene") == (tmp_path / "mv4d/scene").resolve()
    for bad in ("../escape", "/etc/passwd", "mv4d/../../escape"):
        with pytest.raises(InvalidInput, match="outside the output folder"):
            inside(tmp_path, bad)
