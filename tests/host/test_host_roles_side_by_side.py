"""The composed guider's roles side by side (GuiderSettings.roles_side_by_side): the video model's and the multi-view
model's calls of one evaluation in flight at once, each from a thread of its own (on a GPU each on a CUDA stream of
its own). Exact: the grid is the one the roles give one after another, bit for bit. Where the calls are sized
automatically the roles run one after another; a failing role lets the other finish before its error goes up."""

from __future__ import annotations

import dataclasses
import logging
import threading
import pytest
import torch

from test_host_composition import (cameras, composed_guider, grid_conditioning, grid_noise, models, references,  # noqa: F401
                                   sample, spy_on_unet_calls)

PER_CALL = dict(videos_per_call=2, multiview_sets_per_call=2)
WAIT_SECONDS = 60  # only a guard against a hang: both roles meet at their first call within moments when side by side


def side_by_side(guider):
    """The same guider's models, conditioning and settings, with the roles side by side."""
    from mv4d.integration.composed_guider import ComposedGuider

    return ComposedGuider(guider.roles[0].model, guider.roles[1].model, guider.grid_conditioning,
                          dataclasses.replace(guider.settings, roles_side_by_side=True))


def calls_by_thread(meet: bool = False, on_call=None):
    """Every UNet call as spy_on_unet_calls records it (model class first, the calling thread's name last). meet: the
    two models' first calls wait for each other (a barrier of two), which only returns if both are in flight at
    once. on_call(model class, call index) runs before each call."""
    barrier, met = threading.Barrier(2, timeout=WAIT_SECONDS), set()

    def before_call(calls):
        name = calls[-1][0]
        if meet and name not in met:
            met.add(name)
            barrier.wait()
        if on_call:
            on_call(name, sum(call[0] == name for call in calls) - 1)

    return spy_on_unet_calls(before_call)


def test_the_roles_side_by_side_give_the_same_grid_with_both_in_flight_at_once(mv4d_nodes, models, cameras, references):  # noqa: F811
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    noise = grid_noise(5)
    one_after_another = composed_guider(mv4d_nodes, models, conditioning, **PER_CALL)
    with calls_by_thread() as plain_calls:
        expected = sample(one_after_another, noise, latent)
    with calls_by_thread(meet=True) as calls:
        grid = sample(side_by_side(one_after_another), noise, latent)
    assert torch.equal(grid, expected)
    assert sorted(call[0] for call in calls) == sorted(call[0] for call in plain_calls)
    threads = {name: {call[-1] for call in calls if call[0] == name} for name in ("SVD_img2vid", "SV3D_p")}
    print(f"threads per model: {threads}")
    assert threads["SVD_img2vid"] == {threading.current_thread().name}
    assert len(threads["SV3D_p"]) == 1 and next(iter(threads["SV3D_p"])).startswith("mv4d-role")


def test_automatic_call_sizes_keep_the_roles_one_after_another(mv4d_nodes, models, cameras, references, caplog):  # noqa: F811
    """Automatic chunks size each call by the memory free when it starts, which the other role would be using."""
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = side_by_side(composed_guider(mv4d_nodes, models, conditioning, videos_per_call=0, multiview_sets_per_call=0))
    with caplog.at_level(logging.INFO), calls_by_thread() as calls:
        sample(guider, grid_noise(5), latent)
    assert {call[-1] for call in calls} == {threading.current_thread().name}
    told = [r.getMessage() for r in caplog.records if "one after another" in r.getMessage()]
    assert len(told) == 1 and "fixed number of videos and multi-view sets per call" in told[0]


def test_a_failing_role_lets_the_other_finish_before_its_error_goes_up(mv4d_nodes, models, cameras, references):  # noqa: F811
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = side_by_side(composed_guider(mv4d_nodes, models, conditioning, **PER_CALL))
    failed = threading.Event()
    multiview_calls = -(-guider.grid_conditioning.frames // PER_CALL["multiview_sets_per_call"])

    def on_call(name, index):
        if name == "SVD_img2vid":
            failed.set()
            raise RuntimeError("the video model failed")
        assert failed.wait(WAIT_SECONDS)  # the multi-view role's calls go on after the video model's error

    with calls_by_thread(on_call=on_call) as calls, pytest.raises(RuntimeError, match="the video model failed"):
        sample(guider, grid_noise(5), latent)
    assert sum(call[0] == "SV3D_p" for call in calls) == multiview_calls  # all of its first evaluation, done
