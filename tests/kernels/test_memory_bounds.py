"""Sizes a user can type are checked against a memory estimate before anything that big is allocated (issue 12,
items 8-12): the refusal names the estimate, the bound and the fix, and happens under an address-space limit
far below what the request would need (so nothing was allocated first). Where the work is made bounded instead
(blocks, sampled rows), the results equal the unbounded computation, and long loops report each step so that a
Cancel stops them."""

from __future__ import annotations

import re

import pytest
import torch

from mv4d.kernels import memory
from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.epipolar import BUILD_BYTES_PER_PAIR, build_epipolar_mask
from mv4d.kernels.epipolar_preview import SUMMARY_ENTRIES, pair_density, pick_query_cells, render_mask_preview
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.multiview_video import MultiviewVideo, even_times
from mv4d.kernels.splats import rasterize
from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
from mv4d.kernels.splats.init import initial_gaussians
from mv4d.kernels.splats.model import GaussianFrame, MotionConfig, Splats4D, frames_at_times, new_gaussians
from mv4d.kernels.splats.views import render_images, turntable
from mv4d.kernels.synthetic_scene import example_multiview_video

from mv4d_limits import memory_limit, time_limit

GIB = 2**30
MESSAGE = r"needs about [\d.]+ [KMGT]iB, more than the [\d.]+ [KMGT]iB this machine has free\. Fix: "


class Stop(Exception):
    pass


def test_a_refusal_names_the_estimate_the_bound_and_the_fix(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 3 * GIB)
    with pytest.raises(InvalidInput) as refused:
        memory.check_memory("frames", 5.5 * GIB, "100 images", "render fewer frames")
    assert str(refused.value) == "frames: 100 images needs about 5.5 GiB, more than the 3.0 GiB this machine has free. Fix: render fewer frames"
    memory.check_memory("frames", 2 * GIB, "100 images", "render fewer frames")  # fits: no error


def test_available_memory_is_known_here():
    assert memory.available_bytes("cpu") > 0


def test_an_epipolar_mask_of_a_10000_frame_trajectory_is_refused_before_allocating():
    rig = orbit_rig(10_000, height=64, width=64)  # the 10,000-frame pose file: 99,990,000 ordered pairs
    with memory_limit(64 * 2**20), time_limit(10, "refusing the mask"):
        with pytest.raises(InvalidInput, match=r"^cameras: the masks of 99990000 ordered pairs of views \(10000 views\) " + MESSAGE
                           + r"use fewer views.*max_frames"):
            build_epipolar_mask(rig, (32, 32))


def test_building_masks_stays_within_its_estimate():
    rig = orbit_rig(200, height=64, width=64)
    pairs = 200 * 199
    with memory_limit(BUILD_BYTES_PER_PAIR * pairs):
        mask = build_epipolar_mask(rig, (32, 32))
    assert mask.num_pairs == pairs


@pytest.fixture(scope="module")
def largest_mask():
    """The schema's largest latent, 1024 x 1024: the dense mask of one pair would be 10^12 entries."""
    return build_epipolar_mask(orbit_rig(2, height=8192, width=8192), (1024, 1024))


def test_the_preview_builds_only_the_query_rows_it_shows(largest_mask):
    cells = pick_query_cells(largest_mask, 8, 0)
    with memory_limit(1.5 * GIB), time_limit(300, "previewing a 1024 x 1024 mask"):
        picture = render_mask_preview(largest_mask, 0, cells, panel_height=256)
        density, rows = pair_density(largest_mask, 0)
    assert picture.shape == (256, 2 * 256 + 8, 3) and 0 < density < 0.05 and rows == SUMMARY_ENTRIES // largest_mask.num_keys


def test_rows_picked_by_index_are_those_rows_of_the_whole_mask():
    mask = build_epipolar_mask(orbit_rig(3, height=128, width=96), (12, 9))
    rows = torch.tensor([5, 0, 77, 31])
    for pair in range(mask.num_pairs):
        assert torch.equal(mask.dense([pair], rows), mask.dense([pair])[:, rows])


def test_the_sampled_density_is_exact_when_every_row_fits_and_close_when_sampled():
    mask = build_epipolar_mask(orbit_rig(3, height=256, width=256), (48, 48))
    exact = mask.density([1])
    assert torch.equal(mask.density([1], max_queries=mask.num_queries), exact)
    assert torch.allclose(mask.density([1], max_queries=400), exact, rtol=0.1)


def frame_of(count: int, generator: torch.Generator, spread: float = 0.01, opacity: float = 0.05, grad: bool = False) -> GaussianFrame:
    means = (torch.rand(count, 3, generator=generator) - 0.5) * spread + torch.tensor([0.0, 0.0, 2.0])
    fields = [means, torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1),
              0.02 + 0.02 * torch.rand(count, 3, generator=generator), torch.full((count,), opacity), torch.rand(count, 1, 3, generator=generator)]
    if grad:
        fields = [field.clone().requires_grad_(True) for field in fields]
    return GaussianFrame(*fields, sh_degree=0)


def render_one(frame: GaussianFrame, size: int = 32):
    intrinsics = torch.tensor([[[60.0, 0, size / 2], [0, 60.0, size / 2], [0, 0, 1]]])
    return rasterize.render(frame, torch.eye(4)[None], intrinsics, size, size, torch.ones(3), "torch")


def test_blocks_of_a_tile_list_give_the_same_image_and_gradients(monkeypatch):
    """Issue 12, item 10: a tile's Gaussians are composited a block at a time, transmittance carried over."""
    frame = frame_of(3000, torch.Generator().manual_seed(0), spread=0.3, opacity=0.02, grad=True)
    whole = render_one(frame)
    whole.colors.square().sum().backward()
    expected = [field.grad.clone() for field in (frame.means, frame.opacities, frame.sh)]
    for field in (frame.means, frame.quats, frame.scales, frame.opacities, frame.sh):
        field.grad = None
    monkeypatch.setattr(rasterize, "_TORCH_CHUNK_BYTES", 48 * 256 * 37)  # blocks of 37 Gaussians, one tile at a time
    blocked = render_one(frame)
    blocked.colors.square().sum().backward()
    assert torch.allclose(blocked.colors, whole.colors, atol=1e-6) and torch.allclose(blocked.alphas, whole.alphas, atol=1e-6)
    for field, grad in zip((frame.means, frame.opacities, frame.sh), expected):
        assert torch.allclose(field.grad, grad, atol=1e-5 * float(grad.abs().max()), rtol=0)  # float32 sums in another order


def test_one_tile_holding_a_million_gaussians_renders_in_bounded_memory():
    frame = frame_of(1_000_000, torch.Generator().manual_seed(1))
    # the projection's per-Gaussian arrays (~ 0.4 KB each) plus one block of at most 256 MiB; before, the tile's
    # whole list was composited at once: 256 pixels x 10^6 Gaussians x 48 bytes = 12 GB
    with memory_limit(0.5 * GIB + 1_000_000 * 400), torch.no_grad():
        output = render_one(frame, size=16)
    assert output.colors.shape == (1, 16, 16, 3) and float(output.alphas[0, 8, 8, 0]) > 0.99


def small_video(views: int = 3, frames: int = 2, size: int = 32) -> MultiviewVideo:
    return example_multiview_video(orbit_rig(views, height=size, width=size), frames, supersample=1)


def test_a_cpu_fit_of_two_million_gaussians_is_refused_before_allocating():
    """Issue 12, item 10: on the PyTorch rasteriser 2,000,000 initial Gaussians passed 7.6 GB in 23 s."""
    video = small_video()
    settings = FitSettings(iterations=10, initial_gaussians=2_000_000, max_gaussians=2_000_000, backend="torch")
    with memory_limit(128 * 2**20), time_limit(10, "refusing the fit"):
        with pytest.raises(InvalidInput, match=r"^gaussians: a step of the PyTorch rasteriser with 2000000 Gaussians in 3 views " + MESSAGE
                           + r"lower initial_gaussians, max_gaussians or resolution.*or run on a CUDA GPU"):
            fit_dynamic_gaussians(video, settings)


def test_a_rasteriser_step_over_free_memory_is_refused_before_compositing(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10 * 2**20)
    with pytest.raises(InvalidInput, match=r"^gaussians: a step of the PyTorch rasteriser \(\d+ tile listings of Gaussians, with gradients\) needs"):
        render_one(frame_of(5000, torch.Generator().manual_seed(2), grad=True))
    with torch.no_grad():  # without gradients the blocks bound the memory: nothing to refuse
        render_one(frame_of(5000, torch.Generator().manual_seed(2)))


def test_carving_tests_candidates_in_bounded_batches_and_reports_each(monkeypatch):
    from mv4d.kernels.splats import init

    monkeypatch.setattr(init, "CARVE_BATCH", 500)
    batches = []
    gaussians = initial_gaussians(small_video(), 400, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0),
                                  on_batch=lambda: batches.append(1))
    assert gaussians.count == 400 and len(batches) >= 400 * 4 // 500 // 4 + 1

    def cancel():
        raise Stop
    with pytest.raises(Stop):
        initial_gaussians(small_video(), 400, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0), on_batch=cancel)


def test_rendering_more_images_than_fit_is_refused_before_allocating():
    scene = Splats4D(new_gaussians(torch.zeros(4, 3), torch.rand(4, 3), torch.full((4,), 0.1), MotionConfig()), even_times(3))
    rig, times = turntable(scene, 1000, 10.0, 2.0, 33.8, 4096, 4096)  # the schema's maximum: 1000 images of 4096 x 4096
    with memory_limit(64 * 2**20):
        with pytest.raises(InvalidInput, match=r"^images: 1000 images of 4096 x 4096 " + MESSAGE + "render fewer frames or smaller images"):
            render_images(scene.gaussians, rig, times, torch.ones(3))


def test_every_camera_at_every_time_is_checked_before_the_cameras_are_repeated():
    from mv4d.kernels.splats.views import grid_request

    trajectory = orbit_rig(100_000, height=4096, width=4096)  # a long pose file, at the schema's largest size
    with memory_limit(64 * 2**20):
        with pytest.raises(InvalidInput, match=r"^images: 100000 cameras x 1000 times = 100000000 images of 4096 x 4096 " + MESSAGE):
            grid_request(trajectory, torch.linspace(0, 1, 1000))


def test_the_example_scene_refuses_what_does_not_fit_and_reports_each_image():
    with memory_limit(64 * 2**20):
        with pytest.raises(InvalidInput, match=r"^cameras: 256 views x 1000 frames of 8192 x 8192 " + MESSAGE):
            example_multiview_video(orbit_rig(256, height=8192, width=8192), 1000)
    seen = []

    def cancel_at_the_third(done, total):  # what ComfyUI's progress hook does when Cancel is pressed
        seen.append((done, total))
        if done == 3:
            raise Stop
    with pytest.raises(Stop):
        example_multiview_video(orbit_rig(2, height=16, width=16), 4, supersample=1, on_image=cancel_at_the_third)
    assert seen == [(1, 8), (2, 8), (3, 8)]


def test_per_frame_splats_are_checked_before_they_are_built(monkeypatch):
    gaussians = new_gaussians(torch.zeros(1000, 3), torch.rand(1000, 3), torch.full((1000,), 0.1), MotionConfig())
    fields = frames_at_times(gaussians, torch.linspace(0, 1, 7), "fix it")
    assert fields["positions"].shape == (7, 1000, 3) and fields["sh"].shape == (7, 1000, 4, 3)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**20)
    with pytest.raises(InvalidInput, match=re.escape("frame_times: the scene at each of its 50000 frame times (1000 Gaussians) needs about")):
        frames_at_times(gaussians, torch.linspace(0, 1, 50_000), "fix it")
