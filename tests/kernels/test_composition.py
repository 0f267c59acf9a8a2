"""Diffusion² composition kernels: schedules, per-view weights, grid layouts and the rollback Euler sampler."""

from __future__ import annotations

import math

import pytest
import torch

from mv4d.kernels.composition import (CompositionSchedule, balanced_chunk, cfg_scales, cfg_scales_all_one, check_descending, chunks, items_that_fit,
                                      model_weights, multiview_weight, sample_rollback_euler,
                                      step_of_sigma, view_video_shares)
from mv4d.kernels.errors import InvalidInput

# c_v of the official code for SV3D's 21 views (main.py, "0.5 * (1 + cos(2 * pi * (x + 1) / 10.5))")
OFFICIAL_CLOSENESS = [0.91311939, 0.68267051, 0.38873953, 0.13347406, 0.00558459, 0.04951557, 0.25, 0.53736505,
                      0.8117449, 0.9777864, 0.9777864, 0.8117449, 0.53736505, 0.25, 0.04951557, 0.00558459,
                      0.13347406, 0.38873953, 0.68267051, 0.91311939, 1.0]


def test_schedules_follow_their_formulas():
    steps = 50
    for step in range(steps):
        x = step / (steps - 1)
        assert multiview_weight(CompositionSchedule("constant", weight=0.6), step, steps) == 0.6
        assert multiview_weight(CompositionSchedule("linear", start=0.9, end=0.1), step, steps) == pytest.approx(0.9 - 0.8 * x)
        logistic = CompositionSchedule("logistic", start=1.0, end=0.0, logistic_k=20.0, logistic_center=0.5)
        assert multiview_weight(logistic, step, steps) == pytest.approx(1 - 1 / (1 + math.exp(-20 * (x - 0.5))))
    logistic = [multiview_weight(CompositionSchedule("logistic"), step, steps) for step in range(steps)]
    assert logistic[0] > 0.99 and logistic[-1] < 0.01  # the multi-view weight decreases during denoising
    assert all(a > b for a, b in zip(logistic, logistic[1:]))
    assert multiview_weight(CompositionSchedule("linear", start=0.7, end=0.2), 0, 1) == 0.7  # one step: the start


def test_per_view_shares_reproduce_the_official_table_for_sv3d_azimuths():
    azimuths = [360.0 * (v + 1) / 21 for v in range(21)]
    shares = view_video_shares(azimuths)
    expected = 1 - 0.75 * (1 - torch.tensor(OFFICIAL_CLOSENESS, dtype=torch.float64))
    assert (shares - expected).abs().max() < 1e-7


def test_model_weights_sum_to_one_and_switch_off_per_view_modulation():
    azimuths = [360.0 * (v + 1) / 21 for v in range(21)]
    for per_view in (True, False):
        schedule = CompositionSchedule("constant", weight=0.6, per_view=per_view)
        video, multiview = model_weights(schedule, 3, 10, azimuths)
        assert torch.allclose(video + multiview, torch.ones(21, dtype=torch.float64))
    video, multiview = model_weights(CompositionSchedule("constant", weight=0.6, per_view=False), 0, 10, azimuths)
    assert torch.allclose(multiview, torch.full((21,), 0.6, dtype=torch.float64))
    video, multiview = model_weights(CompositionSchedule("constant", weight=0.0, per_view=True), 0, 10, azimuths)
    assert multiview[4] > 0.7 and multiview[-1] == 0.0  # side view leans on multi-view; the input view does not


def test_bad_schedules_are_refused():
    with pytest.raises(InvalidInput, match="schedule"):
        CompositionSchedule("cosine")
    with pytest.raises(InvalidInput) as caught:
        CompositionSchedule("constant", weight=1.5)
    assert caught.value.argument == "weight"


def test_step_of_sigma_finds_the_interval():
    sigmas = torch.tensor([700.0, 100.0, 10.0, 1.0, 0.0])
    assert [step_of_sigma(sigmas, s) for s in (700.0, 100.0, 10.0, 1.0)] == [0, 1, 2, 3]
    assert step_of_sigma(sigmas, 50.0) == 1  # between points (Heun's second evaluation)
    assert step_of_sigma(sigmas, 800.0) == 0


def test_chunks_cover_the_items():
    assert chunks(7, 3) == [(0, 3), (3, 6), (6, 7)] and chunks(2, 0) == [(0, 1), (1, 2)] and chunks(2, 99) == [(0, 2)]


def test_balanced_chunks_use_the_fewest_calls_and_never_exceed_the_room():
    for total in range(1, 30):
        for fit in range(0, 32):
            size = balanced_chunk(total, fit)
            room = max(1, min(fit, total))
            assert 1 <= size <= room
            assert len(chunks(total, size)) == -(-total // room)  # as few calls as the room allows
    assert balanced_chunk(21, 8) == 7 and balanced_chunk(25, 12) == 9 and balanced_chunk(25, 100) == 25


def test_cfg_scales_and_sigma_checks():
    assert cfg_scales(1.5, 3.0, 4).tolist() == pytest.approx([1.5, 2.0, 2.5, 3.0])
    assert cfg_scales(2.5, 2.5, 1).tolist() == [2.5]
    for first, last, count in ((1.0, 1.0, 5), (1.0, 3.0, 1), (1.0, 3.0, 4), (1.5, 1.0, 3), (2.0, 2.0, 1)):
        assert cfg_scales_all_one(first, last, count) == bool((cfg_scales(first, last, count) == 1.0).all())
        assert cfg_scales(first, last, count, device=torch.device("meta")).shape == (count,)  # made where asked
    check_descending(torch.tensor([700.0, 1.0, 0.0]))
    for bad in (torch.tensor([0.0, 1.0, 700.0]), torch.tensor([5.0, 5.0]), torch.tensor([5.0])):
        with pytest.raises(InvalidInput) as caught:
            check_descending(bad)
        assert caught.value.argument == "sigmas"


def euler_reference(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def test_rollback_euler_without_rollback_is_euler_and_rollback_repeats_steps():
    torch.manual_seed(0)
    target = torch.randn(2, 3)
    calls = []

    def model(x, sigma, **_):  # the exact denoiser of a point mass at `target`
        calls.append(float(sigma[0]))
        return target.expand_as(x)

    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.0])
    x = torch.randn(2, 3) * 80
    plain = sample_rollback_euler(model, x, sigmas, rollback_steps=0)
    assert torch.allclose(plain, euler_reference(model, x, sigmas)) and torch.allclose(plain, target)
    calls.clear()
    seen = []
    sample_rollback_euler(model, x, sigmas, {"seed": 5}, callback=lambda info: seen.append(info["i"]), rollback_steps=2)
    assert calls == [80.0, 80.0, 20.0, 20.0, 5.0, 1.0] and seen == [0, 1, 2, 3]
    again = sample_rollback_euler(model, x, sigmas, {"seed": 5}, rollback_steps=2)
    assert torch.allclose(again, target)  # the last steps are plain Euler onto the point mass


def test_rollback_noise_has_the_step_size_as_std_and_is_seeded():
    sigmas = torch.tensor([10.0, 6.0, 0.0])
    x = torch.zeros(20000)
    positions = []

    def identity_denoiser(x, sigma, **_):  # D(x) = x: the Euler step leaves x alone, only the rollback noise moves it
        positions.append(x.clone())
        return x

    sample_rollback_euler(identity_denoiser, x, sigmas, {"seed": 3}, rollback_steps=1)
    added = positions[1] - positions[0]
    assert added.std().item() == pytest.approx(4.0, rel=0.03)
    positions.clear()
    sample_rollback_euler(identity_denoiser, x, sigmas, {"seed": 3}, rollback_steps=1)
    assert torch.equal(positions[1] - positions[0], added)


def test_items_that_fit_follow_an_affine_memory_line_and_grow_step_by_step():
    gib = 2**30
    # one measured call: its whole peak is per-item cost
    assert items_that_fit({1: 4.5 * gib}, 17 * gib) == 3
    # two: fixed 2 GiB + 1.25 GiB per item; 14.45 GiB of room holds 9 but growth is limited to 2 * 3 + 1
    assert items_that_fit({1: 3.25 * gib, 3: 5.75 * gib}, 14.45 * gib) == 7
    assert items_that_fit({1: 3.25 * gib, 3: 5.75 * gib, 7: 10.75 * gib}, 14.45 * gib) == 9
    # noise that makes the line fall back is read as per-item cost of the largest call; no room still means 1
    assert items_that_fit({2: 4 * gib, 4: 3.9 * gib}, 10 * gib) == 9
    assert items_that_fit({1: 4 * gib}, 1 * gib) == 1
    # on memory that is exactly affine, the answer is the largest count that fits (within the growth limit)
    for fixed, per, room in ((1e9, 0.7e9, 9e9), (3e9, 1.1e9, 20e9), (0.2e9, 2e9, 5e9)):
        peaks = {1: fixed + per, 2: fixed + 2 * per}
        n = items_that_fit(peaks, room)
        assert fixed + per * n <= room and (n == 5 or fixed + per * (n + 1) > room)
