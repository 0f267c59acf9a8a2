import math

import pytest
import torch
import torch.nn.functional as F

from mv4d.kernels.cameras import CameraRig, look_at, orbit_rig
from mv4d.kernels.epipolar import (
    CVD_BAND_FRACTION,
    CVD_DECAY,
    build_epipolar_mask,
    epipolar_attention,
    reference_size_for,
)
from mv4d.kernels.errors import InvalidInput

from mv4d_test_scenes import random_points, random_rig


def cell_index(pixels, rig, size):
    """Row-major index of the feature cell containing each pixel position."""
    rows = (pixels[:, 1] * size[0] / rig.height).floor().long()
    cols = (pixels[:, 0] * size[1] / rig.width).floor().long()
    return rows * size[1] + cols


def visible_in_both(pixels, depth, rig, source, target):
    def inside(view):
        x, y = pixels[view, :, 0], pixels[view, :, 1]
        return (depth[view] > 0) & (x >= 0) & (x < rig.width) & (y >= 0) & (y < rig.height)
    return inside(source) & inside(target)


def correspondence_hits(mask, rig, points):
    """(true correspondences inside the mask, total) over all pairs of the mask."""
    pixels, depth = rig.project(points)
    hits = total = 0
    for pair_index, (source, target) in enumerate(mask.pairs.tolist()):
        seen = visible_in_both(pixels, depth, rig, source, target)
        queries = cell_index(pixels[source, seen], rig, mask.query_size)
        keys = cell_index(pixels[target, seen], rig, mask.key_size)
        hits += int(mask.dense([pair_index])[0][queries, keys].sum())
        total += int(seen.sum())
    return hits, total


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (17, 23), (48, 64)])
def test_true_correspondences_fall_inside_the_hard_mask(size):
    generator = torch.Generator().manual_seed(1000 * size[0] + size[1])
    densities = []
    hits = total = 0
    for _ in range(3):  # random scenes, random rigs of 3 cameras = 6 ordered pairs each
        rig = random_rig(3, generator, height=240, width=320)
        mask = build_epipolar_mask(rig, size, tau=3.0)
        scene_hits, scene_total = correspondence_hits(mask, rig, random_points(3000, generator))
        hits, total = hits + scene_hits, total + scene_total
        densities.append(float(mask.density([0, 3]).mean()))
    fraction = hits / total
    density = sum(densities) / len(densities)
    print(f"\nhard mask tau=3 px at 320x240, {size[1]}x{size[0]} cells: {fraction:.4%} of {total} true "
          f"correspondences inside, density {density:.2%}")
    assert total > 10_000
    assert fraction >= 0.99
    assert density < 0.35  # a mask that lets everything through would pass the first check: this one must not


def test_correspondences_at_the_cvd_setting():
    """CVD: masks measured at 256 px for every UNet level of a 256 px model (latents 32, 16, 8, 4)."""
    generator = torch.Generator().manual_seed(7)
    rig = random_rig(4, generator, height=256, width=256)
    points = random_points(4000, generator)
    for latent in (32, 16, 8, 4):
        mask = build_epipolar_mask(rig, (latent, latent), reference_size=reference_size_for(rig, 256))
        hits, total = correspondence_hits(mask, rig, points)
        assert hits / total >= 0.99, latent


def test_the_epipolar_constraint_holds_for_the_line_maps():
    generator = torch.Generator().manual_seed(11)
    rig = random_rig(3, generator)
    mask = build_epipolar_mask(rig, (8, 8))
    pixels, _ = rig.project(random_points(200, generator))
    ones = torch.ones(200, 1, dtype=torch.float64)
    for line_map, (source, target) in zip(mask.line_maps, mask.pairs.tolist()):
        lines = torch.cat([pixels[source], ones], 1) @ line_map.T
        residual = (torch.cat([pixels[target], ones], 1) * lines).sum(1).abs() / lines[:, :2].norm(dim=1)
        assert residual.max() < 1e-6  # x2^T F x1 ~ 0, as a distance in pixels


def sampled_min_distance(line_map, query_centre, key_centre, query_half, key_half, samples=9):
    """Brute force: minimum over points of both cells of the distance to the epipolar line, in pixels."""
    offsets = torch.linspace(-1, 1, samples, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="xy"), -1).reshape(-1, 2)
    sources = query_centre[:2] + grid * torch.tensor(query_half, dtype=torch.float64)
    targets = key_centre[:2] + grid * torch.tensor(key_half, dtype=torch.float64)
    lines = torch.cat([sources, torch.ones(len(sources), 1, dtype=torch.float64)], 1) @ line_map.T
    lines = lines / lines[:, :2].norm(dim=1, keepdim=True)
    return (torch.cat([targets, torch.ones(len(targets), 1, dtype=torch.float64)], 1) @ lines.T).abs().min()


def forward_motion_rig():
    """The second camera moves towards the object: both epipoles lie inside the images, where lines fan out."""
    eyes = torch.tensor([[0.0, -3.0, 0.2], [0.3, -2.0, 0.4]], dtype=torch.float64)
    world_to_camera = torch.cat([look_at(eye[None], (0.0, 0.0, 0.0)) for eye in eyes])
    K = torch.tensor([[150.0, 0, 80], [0, 150.0, 60], [0, 0, 1]], dtype=torch.float64)
    return CameraRig(world_to_camera, K, 120, 160)


@pytest.mark.parametrize("scene", ["random", "forward"])
def test_hard_mask_is_exactly_the_cells_within_tau(scene):
    rig = random_rig(2, torch.Generator().manual_seed(5), height=120, width=160) if scene == "random" else forward_motion_rig()
    tau = 3.0
    mask = build_epipolar_mask(rig, (6, 8), pairs=[(0, 1), (1, 0)], tau=tau)
    half = (10.0, 10.0)
    centres = (torch.stack(torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij"), -1).reshape(-1, 2).flip(-1) + 0.5).double() * 20
    samples = 17  # 1.25 px apart: a sampled minimum overshoots the true one by well under 1 px
    for pair, dense in enumerate(mask.dense()):
        for q in range(48):
            for k in range(48):
                distance = float(sampled_min_distance(mask.line_maps[pair], centres[q], centres[k], half, half, samples))
                if dense[q, k]:
                    assert distance <= tau + 1.0, (pair, q, k, distance)  # nothing far from the band is let in
                else:
                    assert distance > tau, (pair, q, k, distance)  # nothing within tau is ever left out


def test_soft_bias_is_cvds_formula():
    rig = random_rig(2, torch.Generator().manual_seed(9), height=256, width=256)
    mask = build_epipolar_mask(rig, (16, 16), pairs=[(1, 0)], mode="soft")
    # CVD's released code, written out independently: F = K2^-T [t]x R K1^-1 from the relative pose, distances of
    # cell centres (256-px grid) to each query's line, band = 3/128 x the largest distance, bias -(d-band)+ x 3/band.
    relative = rig.relative_pose(1, 0)
    R, t = relative[:3, :3], relative[:3, 3]
    t_cross = torch.tensor([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]], dtype=torch.float64)
    fundamental = torch.linalg.inv(rig.intrinsics[0]).T @ t_cross @ R @ torch.linalg.inv(rig.intrinsics[1])
    centres = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2).flip(-1) + 0.5) * 16
    coords = torch.cat([centres, torch.ones(256, 1)], 1).double()
    lines = coords @ fundamental.T
    distance = (coords @ lines.T).T.abs() / lines[:, :2].norm(dim=1, keepdim=True)
    band = 3 / 128 * distance.max()
    expected = -(distance - band).clamp(min=0) * (3 / band)
    assert torch.allclose(mask.dense()[0].double(), expected, atol=1e-3, rtol=1e-4)
    assert (CVD_BAND_FRACTION, CVD_DECAY) == (3 / 128, 3.0)


def test_identical_cameras_get_a_seeded_pseudo_epipolar_line_through_the_pixel():
    one = orbit_rig(1, height=128, width=128)
    rig = CameraRig(one.world_to_camera.repeat(2, 1, 1), one.intrinsics, 128, 128)
    assert rig.fundamental_matrices([0], [1]).abs().max() < 1e-12  # no epipolar geometry here
    mask = build_epipolar_mask(rig, (16, 16), tau=2.0, seed=3)
    assert mask.pseudo.all()
    dense = mask.dense()
    diagonal = torch.arange(256)
    assert dense[:, diagonal, diagonal].all()  # the true correspondence x -> x is always inside
    # every row is a straight band: all its cells lie near one line through the query cell
    centres = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2).flip(-1) + 0.5) * 8
    for pair in range(2):
        for query in (17, 100, 200):
            line = mask.line_maps[pair].float() @ torch.tensor([*centres[query].tolist(), 1.0])
            inside = centres[dense[pair, query]]
            distance = (inside @ line[:2] + line[2]).abs() / line[:2].norm()
            assert distance.max() <= 2.0 + 8 * math.sqrt(2)
    assert torch.equal(build_epipolar_mask(rig, (16, 16), tau=2.0, seed=3).line_maps, mask.line_maps)
    assert not torch.equal(build_epipolar_mask(rig, (16, 16), tau=2.0, seed=4).line_maps, mask.line_maps)


def test_a_pure_rotation_gets_a_pseudo_line_through_the_rotated_pixel():
    generator = torch.Generator().manual_seed(13)
    eye = torch.tensor([[0.0, -2.5, 0.3]], dtype=torch.float64)
    first, second = look_at(eye, (0.0, 0.0, 0.0)), look_at(eye, (0.15, 0.0, 0.05))  # same centre, turned
    K = torch.tensor([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]], dtype=torch.float64)
    rig = CameraRig(torch.cat([first, second]), K, 240, 320)
    mask = build_epipolar_mask(rig, (24, 32), tau=3.0)
    assert mask.pseudo.all()
    hits, total = correspondence_hits(mask, rig, random_points(3000, generator))
    assert total > 1000 and hits / total >= 0.99


def test_a_given_homography_puts_the_mapped_pixel_inside():
    rig = orbit_rig(3, height=64, width=64)
    homography = torch.tensor([[1.1, 0.05, -3.0], [0.0, 0.9, 4.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mask = build_epipolar_mask(rig, (16, 16), pairs=[(0, 1), (1, 2)], homographies={(1, 2): homography})
    assert mask.pseudo.tolist() == [False, True]
    centres = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2).flip(-1) + 0.5) * 4
    mapped = torch.cat([centres.double(), torch.ones(256, 1, dtype=torch.float64)], 1) @ homography.T
    mapped = mapped[:, :2] / mapped[:, 2:]
    keep = ((mapped >= 0) & (mapped < 64)).all(1)
    keys = (mapped[keep, 1] / 4).floor().long() * 16 + (mapped[keep, 0] / 4).floor().long()
    assert mask.dense([1])[0][keep.nonzero()[:, 0], keys].all()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_chunked_masks_and_attention_equal_the_whole(mode):
    generator = torch.Generator().manual_seed(21)
    rig = random_rig(3, generator, height=96, width=128)
    mask = build_epipolar_mask(rig, (12, 16), mode=mode, tau=2.0)
    whole = mask.dense()
    chunks = mask.query_chunks(max_bytes=12 * 192 * 16 * 6)  # a few rows at a time
    assert len(chunks) > 4
    chunked_mask = torch.cat([mask.dense(None, rows) for rows in chunks], dim=1)
    if mode == "hard":
        assert torch.equal(chunked_mask, whole)
    else:  # float32 distances computed in other batch shapes: equal to rounding (seen: 1e-4 on values up to 125)
        assert torch.allclose(chunked_mask, whole, rtol=0, atol=1e-6 * float(whole.abs().max()))

    query = torch.randn(6, 2, 192, 8, generator=generator)
    key = torch.randn(6, 2, 192, 8, generator=generator)
    value = torch.randn(6, 2, 192, 8, generator=generator)
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.sdpa_mask())
    if mode == "hard":
        reference = reference.masked_fill(~mask.sdpa_mask().any(-1, keepdim=True), 0)
    chunked = epipolar_attention(query, key, value, mask, max_mask_bytes=6 * 192 * 16 * 7)
    # the soft mask rounds by chunk (above): 1e-4 in a logit moves its weight by 1e-4 relative
    assert torch.allclose(chunked, reference, atol=1e-4)
    assert torch.isfinite(chunked).all()


def test_masks_are_ready_for_sdpa_and_rebuild_at_any_level():
    rig = orbit_rig(4, height=256, width=384)
    mask = build_epipolar_mask(rig, (32, 48))
    assert mask.line_maps.shape == (12, 3, 3)  # the compact form: 9 numbers a pair, whatever the feature size
    sdpa = mask.sdpa_mask([0, 5])
    assert sdpa.shape == (2, 1, 32 * 48, 32 * 48) and sdpa.dtype == torch.bool
    soft = build_epipolar_mask(rig, (32, 48), mode="soft").sdpa_mask([0], dtype=torch.float16)
    assert soft.dtype == torch.float16 and (soft <= 0).all()
    level = mask.at_size((8, 12), (16, 24))
    assert torch.equal(level.dense([1]), build_epipolar_mask(rig, (8, 12), key_size=(16, 24)).dense([1]))
    assert level.dense([1]).shape == (1, 96, 384)


def test_large_feature_maps_are_built_in_bounded_chunks():
    rig = orbit_rig(2, height=1024, width=1024)
    mask = build_epipolar_mask(rig, (128, 128))
    budget = 64 * 2**20
    chunks = mask.query_chunks(max_bytes=budget)
    assert all((rows.stop - rows.start) * mask.num_keys * 16 * mask.num_pairs <= budget for rows in chunks)
    assert sum(rows.stop - rows.start for rows in chunks) == 128 * 128
    first = mask.dense(None, chunks[0])  # one chunk is all that is ever materialised
    assert first.shape == (2, chunks[0].stop, 128 * 128)


@pytest.mark.parametrize(
    "make, argument, words",
    [
        (lambda rig: build_epipolar_mask(rig.select([0]), (8, 8)), "cameras", "at least 2 views"),
        (lambda rig: build_epipolar_mask(rig, (0, 8)), "query_size", "positive"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), key_size=(8, -1)), "key_size", "positive"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), reference_size=(0, 0)), "reference_size", "positive"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), mode="fuzzy"), "mode", "'hard' or 'soft'"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), tau=-1.0), "tau", ">= 0"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), tau=float("nan")), "tau", ">= 0"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), band_fraction=0.0), "band_fraction", "(0, 1]"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), pairs=[(0, 5)]), "pairs", "outside"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), pairs=[(0, 1)], homographies={(0, 1): torch.zeros(3, 3)}), "homographies", "invertible"),
        (lambda rig: build_epipolar_mask(rig, (8, 8), pairs=[(0, 1)], homographies={(0, 1): torch.full((3, 3), float("nan"))}), "homographies", "finite"),
        (lambda rig: build_epipolar_mask(rig, (8, 8)).dense([99]), "pair_indices", "indices"),
        (lambda rig: epipolar_attention(torch.zeros(6, 1, 10, 4), torch.zeros(6, 1, 64, 4), torch.zeros(6, 1, 64, 4), build_epipolar_mask(rig, (8, 8))), "query", "at_size"),
        (lambda rig: reference_size_for(rig, 0), "reference_resolution", "positive"),
    ],
)
def test_bad_mask_input_is_refused_with_the_argument_and_a_fix(make, argument, words):
    rig = orbit_rig(3, height=64, width=64)
    with pytest.raises(InvalidInput) as error:
        make(rig)
    assert error.value.argument == argument
    assert words in str(error.value)
