"""CVD's cross-video synchronisation module on the grid, its masks, pairings and checkpoint layouts.

Properties: a zero proj_out changes nothing; the attention is exactly masked attention of each video's tokens over
its partner's tokens of the same frame and chunk; the result does not depend on how the masks are chunked or
whether they are kept dense; swapping two videos with their cameras swaps the outputs; cond and uncond chunks
never mix; cameras that coincide get pseudo-epipolar masks; projected true correspondences fall inside the masks
at every UNet level; masks are built once per level; matchings are seeded perfect matchings.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mv4d.kernels.cameras import CameraRig, orbit_rig
from mv4d.kernels.epipolar import DenseEpipolarMask, EpipolarMask
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.grid import Grid
from mv4d.kernels.models.cvd import (CrossVideoCall, CrossVideoMasks, CVDModel, convert_cvd_checkpoint, cross_video_attention,
                                     draw_partners, load_cvd_model, normalize_cvd_state_dict, partners_for_step)
from mv4d.kernels.models.motion import ModuleCall

from mv4d_test_scenes import random_points, random_rig

CHANNELS = (32, 32, 64, 64)


def random_cvd(seed: int = 0) -> CVDModel:
    model = CVDModel(CHANNELS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def arcs(videos: int, frames: int, size=(64, 96), shared_start: bool = False) -> CameraRig:
    """One orbit arc per video, video by video: apart (different start azimuths), or all from one camera (as
    CVD's trajectories start, each turning its own way)."""
    rigs = []
    for video in range(videos):
        if shared_start:
            rig = orbit_rig(frames, 10.0 + 5 * video, 2.0, 40.0, *size, 0.0, span_deg=(-1) ** video * 40.0 * (1 + video // 2))
            rig = CameraRig(torch.cat([orbit_rig(1, 10.0, 2.0, 40.0, *size, 0.0).world_to_camera, rig.world_to_camera[1:]]),
                            rig.intrinsics, *size)
        else:
            rig = orbit_rig(frames, 10.0 + 5 * video, 2.0, 40.0, *size, 360.0 * video / videos, span_deg=30.0)
        rigs.append(rig)
    return CameraRig(torch.cat([rig.world_to_camera for rig in rigs]), torch.cat([rig.intrinsics for rig in rigs]), *size)


def cross_call(cameras, grid, partners=None, mode="soft", max_dense_bytes=2**30, max_attention_bytes=2**28, seed=0):
    masks = CrossVideoMasks(cameras, grid, mode=mode, tau=6.0, seed=seed, max_dense_bytes=max_dense_bytes)
    partners = partners_for_step(grid.views, 0, 0) if partners is None else torch.as_tensor(partners)
    return CrossVideoCall(partners, masks, max_attention_bytes)


def run_module(module, x, grid, call):
    with torch.no_grad():
        return module(x, ModuleCall(grid, cross_video=call))


def test_a_zero_initialised_module_changes_nothing():
    grid = Grid(3, 4)
    module = random_cvd().zero_init().by_motion_module()["down_blocks.0.motion_modules.0"]
    x = torch.randn(2 * grid.cells, 32, 8, 12, generator=torch.Generator().manual_seed(1))
    out = run_module(module, x, grid, cross_call(arcs(3, 4), grid))
    assert torch.equal(out, x)
    assert not torch.equal(run_module(random_cvd().by_motion_module()["down_blocks.0.motion_modules.0"], x, grid,
                                      cross_call(arcs(3, 4), grid)), x)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("videos, partners", [(2, [1, 0]), (3, [2, 0, 0])])
def test_attention_is_masked_attention_over_the_partner_at_the_same_frame(mode, videos, partners):
    grid, size, heads = Grid(videos, 3), (4, 6), 4
    call = cross_call(arcs(videos, 3, (32, 48)), grid, partners, mode)
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2 * grid.cells, 24, 16, generator=generator) for _ in range(3))  # 2 chunks, 4 x 6 tokens
    out = cross_video_attention(q, k, v, call, grid, size, heads)
    compact = call.masks.compact.at_size(size)
    for chunk in range(2):
        for video in range(videos):
            for frame in range(3):
                item = chunk * grid.cells + grid.index(video, frame)
                other = chunk * grid.cells + grid.index(partners[video], frame)
                mask = compact.dense([int(call.masks.table[video, partners[video], frame])])[0]
                split = [t.reshape(24, heads, 4).transpose(0, 1) for t in (q[item], k[other], v[other])]
                expected = F.scaled_dot_product_attention(*split, attn_mask=mask)
                if mode == "hard":
                    expected = expected.masked_fill(~mask.any(-1, keepdim=True), 0)
                expected = expected.transpose(0, 1).reshape(24, 16)
                assert torch.allclose(out[item], expected, atol=1e-5), (chunk, video, frame)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_the_result_does_not_depend_on_mask_chunking_or_keeping(mode):
    grid = Grid(2, 3)
    module = random_cvd(3).by_motion_module()["up_blocks.3.motion_modules.2"]
    x = torch.randn(2 * grid.cells, 32, 8, 12, generator=torch.Generator().manual_seed(4))
    cameras = arcs(2, 3)
    kept = cross_call(cameras, grid, mode=mode)  # dense masks, built once
    rebuilt = cross_call(cameras, grid, mode=mode, max_dense_bytes=0)  # compact: built block by block in every call
    chunked = cross_call(cameras, grid, mode=mode, max_attention_bytes=2 * 96 * 20 * 12 * 3)  # a few rows at a time
    reference = run_module(module, x, grid, kept)
    assert isinstance(kept.masks.levels()[(8, 12)], DenseEpipolarMask)
    assert len(chunked.masks.at((8, 12)).query_chunks(12, chunked.max_attention_bytes)) > 4
    for other in (rebuilt, chunked):
        assert torch.allclose(run_module(module, x, grid, other), reference, atol=1e-5)
    assert isinstance(rebuilt.masks.levels()[(8, 12)], EpipolarMask)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_swapping_two_videos_with_their_cameras_swaps_the_outputs(mode):
    frames, grid = 3, Grid(2, 3)
    module = random_cvd(5).by_motion_module()["down_blocks.1.motion_modules.1"]
    x = torch.randn(2 * grid.cells, 32, 8, 12, generator=torch.Generator().manual_seed(6))
    cameras = arcs(2, frames)
    swap_items = torch.cat([torch.arange(frames, 2 * frames), torch.arange(frames)])
    swapped_x = torch.cat([x[:grid.cells][swap_items], x[grid.cells:][swap_items]])
    swapped_cameras = cameras.select(swap_items)
    out = run_module(module, x, grid, cross_call(cameras, grid, mode=mode))
    swapped = run_module(module, swapped_x, grid, cross_call(swapped_cameras, grid, mode=mode))
    expected = torch.cat([out[:grid.cells][swap_items], out[grid.cells:][swap_items]])
    assert torch.allclose(swapped, expected, atol=1e-5)
    assert not torch.allclose(swapped, out, atol=1e-3)


def test_cond_and_uncond_chunks_pair_like_with_like():
    grid = Grid(2, 2)
    module = random_cvd(7).by_motion_module()["down_blocks.0.motion_modules.1"]
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2 * grid.cells, 32, 8, 12, generator=generator)
    changed = x.clone()
    changed[grid.cells:] = torch.randn(grid.cells, 32, 8, 12, generator=generator)  # another second chunk
    call = cross_call(arcs(2, 2), grid)
    first, second = run_module(module, x, grid, call), run_module(module, changed, grid, call)
    assert torch.equal(first[:grid.cells], second[:grid.cells])
    alone = run_module(module, x[:grid.cells], grid, call)  # the first chunk sampled on its own
    assert torch.allclose(alone, first[:grid.cells], atol=1e-6)


def test_cameras_that_coincide_get_pseudo_epipolar_masks():
    grid = Grid(3, 4)
    cameras = arcs(3, 4, shared_start=True)  # every video starts at the same camera, then turns its own way
    masks = CrossVideoMasks(cameras, grid, mode="hard", tau=3.0)
    pseudo = masks.compact.pseudo
    first_frame = masks.table[..., 0][~torch.eye(3, dtype=torch.bool)]
    later = masks.table[..., 1:][~torch.eye(3, dtype=torch.bool)].reshape(-1)
    assert pseudo[first_frame].all() and not pseudo[later].any()
    for size in ((8, 12), (4, 6), (2, 3)):  # a line through the same pixel: each cell sees itself in the other video
        dense = masks.at(size).masks[first_frame]
        diagonal = torch.arange(size[0] * size[1])
        assert dense[:, diagonal, diagonal].all()
        assert dense.float().mean() < 0.9  # a line, not everything


def unet_levels(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """Feature sizes of SD's down blocks for a latent (stride-2 convolutions with padding 1 round up)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


@pytest.mark.parametrize("image", [(256, 256), (256, 384), (200, 328)])
def test_projected_true_correspondences_fall_inside_the_masks_at_every_unet_level(image):
    generator = torch.Generator().manual_seed(image[0] + image[1])
    videos, frames = 3, 4
    cameras = random_rig(videos * frames, generator, *image)  # every camera its own pose: no two coincide
    masks = CrossVideoMasks(cameras, Grid(videos, frames), mode="hard", tau=3.0)
    points = random_points(3000, generator)
    pixels, depth = cameras.project(points)
    height, width = image
    for size in unet_levels(height // 8, width // 8):
        dense = masks.at(size).masks
        hits = total = 0
        for source in range(videos):
            for target in range(videos):
                for frame in range(frames if source != target else 0):
                    a, b = source * frames + frame, target * frames + frame
                    seen = (depth[a] > 0) & (depth[b] > 0)
                    for view in (a, b):
                        seen &= (pixels[view, :, 0] >= 0) & (pixels[view, :, 0] < width) & (pixels[view, :, 1] >= 0) & (pixels[view, :, 1] < height)
                    cells = [(pixels[view, seen, 1] * size[0] / height).floor().long() * size[1] + (pixels[view, seen, 0] * size[1] / width).floor().long()
                             for view in (a, b)]
                    hits += int(dense[int(masks.table[source, target, frame])][cells[0], cells[1]].sum())
                    total += int(seen.sum())
        density = float(dense.float().mean())
        print(f"{image[1]}x{image[0]} px, level {size[1]}x{size[0]}: {hits / total:.4%} of {total} correspondences inside, density {density:.2%}")
        assert total > 5000 and hits / total >= 0.99
        assert density < 0.8 or size[0] * size[1] <= 16  # the coarsest levels are a few cells: most are near every line


def test_masks_are_built_once_per_level_and_kept_within_the_budget():
    grid = Grid(2, 2)
    model = random_cvd(9)
    call = cross_call(arcs(2, 2), grid)
    modules = model.by_motion_module()
    for _ in range(3):  # sampling steps x every module of two levels
        for name in ("down_blocks.0.motion_modules.0", "down_blocks.0.motion_modules.1", "up_blocks.3.motion_modules.2"):
            run_module(modules[name], torch.randn(grid.cells, 32, 8, 12), grid, call)
        for name in ("down_blocks.1.motion_modules.0", "up_blocks.2.motion_modules.0"):
            run_module(modules[name], torch.randn(grid.cells, 32, 4, 6), grid, call)
    assert call.masks.builds == 2 and set(call.masks.levels()) == {(8, 12), (4, 6)}
    pairs = 2 * 1 * 2
    assert call.masks.dense_bytes == pairs * (96 * 96 + 24 * 24) * 4  # soft masks in the call's float32
    tight = cross_call(arcs(2, 2), grid, max_dense_bytes=pairs * 24 * 24 * 4)  # room for the small level only
    tight.masks.at((8, 12)), tight.masks.at((4, 6))
    levels = tight.masks.levels()
    assert isinstance(levels[(8, 12)], EpipolarMask) and isinstance(levels[(4, 6)], DenseEpipolarMask)
    tight.masks.clear()
    assert tight.masks.levels() == {} and tight.masks.dense_bytes == 0


def test_matchings_are_seeded_perfect_matchings_drawn_per_step():
    for videos in (2, 4, 6):
        seen = set()
        for step in range(40):
            partners = partners_for_step(videos, 11, step)
            assert (partners != torch.arange(videos)).all() and torch.equal(partners[partners], torch.arange(videos))
            assert torch.equal(partners, partners_for_step(videos, 11, step))  # the same step, the same matching
            seen.add(tuple(partners.tolist()))
        assert len(seen) == {2: 1, 4: 3, 6: 15}[videos] or (videos == 6 and len(seen) > 8)
    assert any(not torch.equal(partners_for_step(4, 11, step, draw=0), partners_for_step(4, 11, step, draw=1)) for step in range(5))
    for step in range(20):  # an odd count: all but one matched, the one left over attends to some other video
        partners = partners_for_step(5, 3, step)
        assert (partners != torch.arange(5)).all()
        assert int((partners[partners] == torch.arange(5)).sum()) >= 4
    with pytest.raises(InvalidInput, match="at least 2 videos"):
        draw_partners(1, torch.Generator())


def cvd_keys(model: CVDModel) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_checkpoint_layouts_load_to_the_same_modules_and_others_are_refused(tmp_path):
    import safetensors.torch

    model = random_cvd(12)
    keys = cvd_keys(model)
    assert len([key for key in keys if key.endswith("proj_out.weight")]) == 20
    assert all(".epi_modules." in key and ".epi_transformer." in key for key in keys)
    wrapped = {"unet_trainable_dict": keys, "epoch": 0}
    prefixed = {f"module.{key}": value for key, value in keys.items()}
    with_buffer = {**keys, "down_blocks.0.epi_modules.0.epi_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.coords": torch.zeros(4, 4, 3)}
    for layout in (wrapped, keys, prefixed, with_buffer):
        loaded = load_cvd_model(normalize_cvd_state_dict(layout)).state_dict()
        assert loaded.keys() == keys.keys() and all(torch.equal(loaded[k], keys[k]) for k in keys)
    torch.save(wrapped, tmp_path / "CVD.ckpt")
    written = convert_cvd_checkpoint(tmp_path / "CVD.ckpt")
    assert written == tmp_path / "CVD.safetensors"
    converted = safetensors.torch.load_file(written)
    assert converted.keys() == keys.keys() and all(torch.equal(converted[k], keys[k]) for k in keys)
    assert not list(tmp_path.glob(".*partial*"))

    with pytest.raises(InvalidInput, match="no CVD synchronisation modules.*motion module"):
        normalize_cvd_state_dict({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(2, 2)})
    with pytest.raises(InvalidInput, match="no CVD synchronisation modules"):
        normalize_cvd_state_dict({"pose_encoder_state_dict": {}, "attention_processor_state_dict": {}})
    with pytest.raises(InvalidInput, match="mid block"):
        normalize_cvd_state_dict({**keys, "mid_block.epi_modules.0.epi_transformer.proj_in.weight": torch.zeros(64, 64)})
    with pytest.raises(InvalidInput, match="lacks 1 of"):
        load_cvd_model(normalize_cvd_state_dict({k: v for k, v in keys.items() if not k.startswith("up_blocks.0.epi_modules.2.epi_transformer.proj_out.bias")}))
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(InvalidInput) as error:
        convert_cvd_checkpoint(tmp_path / "other.ckpt")
    assert error.value.argument == "source" and not (tmp_path / "other.safetensors").exists()


def test_masks_need_one_camera_per_frame_of_every_video():
    with pytest.raises(InvalidInput, match="5 cameras for 2 videos of 3 frames"):
        CrossVideoMasks(arcs(2, 3).select(range(5)), Grid(2, 3))
    with pytest.raises(InvalidInput, match="at least 2 videos"):
        CrossVideoMasks(arcs(2, 3).select(range(3)), Grid(1, 3))


def test_at_real_size_the_modules_have_the_shapes_of_the_v3_motion_modules_they_follow():
    """CVD's EpiModule is the motion module's layout without position tables (MODELS.md: the same shape set as v3,
    about 417M parameters): built on the meta device, no memory."""
    from mv4d.kernels.models.motion import SD15_CHANNELS, MotionModel, MotionVersion

    with torch.device("meta"):
        cvd = CVDModel(SD15_CHANNELS)
        motion = MotionModel(MotionVersion("v3", 32, False, False, "original"), SD15_CHANNELS)
    shapes = {key: tuple(value.shape) for key, value in cvd.state_dict().items()}
    expected = {f"{name.replace('motion_modules', 'epi_modules')}.epi_transformer.{key.split('temporal_transformer.', 1)[1]}": tuple(value.shape)
                for name, module in motion.modules_named().items()
                for key, value in module.state_dict(prefix=f"{name}.").items() if not key.endswith("pos_encoder.pe")}
    assert shapes == expected
    count = sum(value.numel() for value in cvd.parameters())
    assert 410e6 < count < 425e6, count
