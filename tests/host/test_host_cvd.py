"""CVD on tiny models of the real SD1.5 + AnimateDiff v3 + CameraCtrl layout, sampled through ComfyUI.

Properties: zero-initialised synchronisation modules equal CameraCtrl sampling of each video alone (and trained-like
ones do not); swapping two videos with their cameras swaps the sampled videos; the masks are built once per UNet
level for a whole sampling run, at the UNet's own (non-square, odd) level sizes, and dropped afterwards; several
matchings average the predictions of each; CVD.ckpt and its safetensors conversion load the same modules; bad input
is refused naming node, input and fix.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import tiny_cameractrl, tiny_cvd_checkpoint, tiny_cvd_module, tiny_motion_module, tiny_sd15_checkpoint

FRAMES = 4
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_sd15_checkpoint()


@pytest.fixture(scope="module")
def video(sd15):
    from mv4d.integration.patches.motion import with_motion

    return with_motion(sd15[0], tiny_motion_module("v3"))


def prompts(clip, text="a stone cottage in a meadow"):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text)), clip.encode_from_tokens_scheduled(clip.tokenize(""))


def sample(model, clip, noise, steps=3):
    import comfy.sample

    positive, negative = prompts(clip)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise.clone(), steps, 5.0, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), seed=0, disable_pbar=True)


def arcs(videos: int, frames: int = FRAMES, height: int = 64, width: int = 64):
    """One orbit arc per video, starting apart."""
    from mv4d.kernels.cameras import orbit_rig

    return [orbit_rig(frames, 10.0 + 5 * video, 2.0, 40.0, height, width, 360.0 * video / videos, span_deg=(-1) ** video * 40.0)
            for video in range(videos)]


def cvd_model(video, cvd, trajectories, **settings):
    from mv4d.integration.patches.cvd import joined_trajectories, with_cvd
    from mv4d.kernels.grid import Grid
    from mv4d.kernels.models.cvd import CVDSettings

    return with_cvd(video, cvd, tiny_cameractrl(), joined_trajectories(trajectories), Grid(len(trajectories), len(trajectories[0])),
                    CVDSettings(**settings))


def noise_of(videos, frames=FRAMES, height=8, width=8, seed=0):
    return torch.randn(videos * frames, 4, height, width, generator=torch.Generator().manual_seed(seed))


def largest(tensor):
    return max(1.0, float(tensor.abs().max()))


@pytest.mark.parametrize("videos", [2, 4])
def test_zero_initialised_modules_equal_cameractrl_sampling_of_each_video_alone(sd15, video, videos):
    from mv4d.integration.patches.camera_control import with_camera_control

    _, clip, _ = sd15
    trajectories = arcs(videos)
    noise = noise_of(videos)
    together = sample(cvd_model(video, tiny_cvd_module(zero=True), trajectories), clip, noise)
    for index, trajectory in enumerate(trajectories):
        rows = slice(index * FRAMES, (index + 1) * FRAMES)
        alone = sample(with_camera_control(video, tiny_cameractrl(), trajectory), clip, noise[rows])
        difference = float((together[rows] - alone).abs().max())
        print(f"{videos} videos, video {index}: zero CVD vs CameraCtrl alone, max |difference| {difference:.3g}")
        assert difference <= TOLERANCE * largest(alone)
    synchronised = sample(cvd_model(video, tiny_cvd_module(), trajectories), clip, noise)
    assert float((synchronised - together).abs().max()) > 1e-3  # trained-like modules do act


def test_swapping_two_videos_with_their_cameras_swaps_the_outputs(sd15, video):
    _, clip, _ = sd15
    first, second = arcs(2)
    noise = noise_of(2, seed=3)
    swap = torch.cat([torch.arange(FRAMES, 2 * FRAMES), torch.arange(FRAMES)])
    out = sample(cvd_model(video, tiny_cvd_module(), [first, second]), clip, noise)
    swapped = sample(cvd_model(video, tiny_cvd_module(), [second, first]), clip, noise[swap])
    print(f"swap: max |difference| {float((swapped - out[swap]).abs().max()):.3g}")
    assert float((swapped - out[swap]).abs().max()) <= TOLERANCE * largest(out)
    assert float((out[:FRAMES] - out[FRAMES:]).abs().max()) > 1e-3


def test_masks_are_built_once_per_unet_level_for_a_whole_sampling_run(sd15, video, monkeypatch):
    from mv4d.integration.patches.cvd import masks_of
    from mv4d.kernels.epipolar import EpipolarMask

    _, clip, _ = sd15
    latent = (8, 16)  # non-square: 64 x 128 px (CameraCtrl's pose encoder needs latent sides divisible by 8)
    trajectories = arcs(3, height=8 * latent[0], width=8 * latent[1])
    model = cvd_model(video, tiny_cvd_module(), trajectories)
    masks = masks_of(model)
    seen = []
    original_at = type(masks).at
    monkeypatch.setattr(type(masks), "at", lambda self, size, *args: (seen.append(tuple(size)), original_at(self, size, *args))[1])
    built_on_the_fly = []
    original_sdpa = EpipolarMask.sdpa_mask
    monkeypatch.setattr(EpipolarMask, "sdpa_mask", lambda self, *args, **kwargs: (built_on_the_fly.append(1), original_sdpa(self, *args, **kwargs))[1])
    sample(model, clip, noise_of(3, height=latent[0], width=latent[1]), steps=4)
    levels = [(8, 16), (4, 8), (2, 4), (1, 2)]
    assert sorted(set(seen), reverse=True) == levels
    assert len(seen) >= 4 * 2 * 20  # every module, in every step, cond and uncond (maybe in one call)
    assert masks.builds == len(levels) and not built_on_the_fly  # built once each, then only read
    assert masks.levels() == {}  # dropped when the sampling run ended
    compact = cvd_model(video, tiny_cvd_module(), trajectories, mask_cache_mb=0)  # no room: built per call, in blocks
    out = sample(compact, clip, noise_of(3, height=latent[0], width=latent[1]), steps=2)
    assert masks_of(compact).builds == 0 and built_on_the_fly
    kept = sample(model, clip, noise_of(3, height=latent[0], width=latent[1]), steps=2)
    assert float((out - kept).abs().max()) <= TOLERANCE * largest(kept)  # the same result either way


def unet_call(model, x, sigma_index=2):
    """The patched model's eps prediction at one step of a 4-step run, through ComfyUI's model (wrappers applied)."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    options = {**copy.deepcopy(model.model_options.get("transformer_options", {})), "sample_sigmas": sigmas,
               "sigmas": sigmas[sigma_index:sigma_index + 1], "cond_or_uncond": [0],
               "wrappers": model.wrappers}  # as ComfyUI's sampling prepares them (sampler_helpers)
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5)).expand(len(x), -1, -1)
    model.patch_model()
    try:
        with torch.inference_mode():
            timestep = model.model.model_sampling.timestep(sigmas[sigma_index]).expand(len(x))
            return model.model.diffusion_model(x, timesteps=timestep, context=context, transformer_options=options)
    finally:
        model.unpatch_model()


def test_several_matchings_average_the_prediction_of_each(video, monkeypatch):
    import mv4d.integration.patches.cvd as cvd_patch

    trajectories = arcs(4)
    x = noise_of(4, seed=7)
    drawn = []
    original = cvd_patch.partners_for_step
    monkeypatch.setattr(cvd_patch, "partners_for_step", lambda *args: (drawn.append(original(*args)), drawn[-1])[1])
    averaged = unet_call(cvd_model(video, tiny_cvd_module(), trajectories, matchings=2, seed=1), x)
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])
    singles = []
    for partners in list(drawn):
        monkeypatch.setattr(cvd_patch, "partners_for_step", lambda *args, chosen=partners: chosen)
        singles.append(unet_call(cvd_model(video, tiny_cvd_module(), trajectories, matchings=1, seed=1), x))
    assert float((singles[0] - singles[1]).abs().max()) > 1e-4  # the pairing matters
    assert float((averaged - (singles[0] + singles[1]) / 2).abs().max()) <= TOLERANCE * largest(averaged)


def test_cvd_ckpt_and_its_safetensors_conversion_load_the_same_modules(comfy, mv4d_nodes, tmp_path):
    import subprocess
    import sys

    from mv4d.integration.node_errors import NodeInputError
    from mv4d_tiny_models import tiny_motion_state_dict

    comfy.add_model_folder_path("animatediff_models", str(tmp_path))
    torch.save(tiny_cvd_checkpoint(), tmp_path / "CVD.ckpt")
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    # the command README gives, run from the folder that holds the pack (here: the checkout under the name mv4d)
    link = tmp_path / "packs" / "mv4d"
    link.parent.mkdir()
    link.symlink_to(root)
    done = subprocess.run([sys.executable, "-m", "mv4d.kernels.models.cvd", str(tmp_path / "CVD.ckpt")], cwd=link.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "CVD.safetensors").is_file()
    loaded = [run_node(mv4d_nodes.LoadCVDModule, cvd_module=name).result[0].state_dict() for name in ("CVD.ckpt", "CVD.safetensors")]
    assert loaded[0].keys() == loaded[1].keys() and all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0])
    torch.save(tiny_motion_state_dict("v3"), tmp_path / "mm.ckpt")
    with pytest.raises(NodeInputError, match=r"MV4D Load CVD Module: input 'cvd_module': this file holds no CVD synchronisation "
                                             r"modules .*motion module.*Fix: use CVD.ckpt"):
        run_node(mv4d_nodes.LoadCVDModule, cvd_module="mm.ckpt")


def apply(mv4d_nodes, model, trajectories: dict, frames=FRAMES, **settings):
    values = dict(mask_mode="soft", tau=3.0, band_fraction=0.0234, decay=3.0, reference_resolution=256, pairing_seed=0,
                  matchings=1, camera_scale=1.0, mask_cache_mb=1024)
    values.update(settings)
    return run_node(mv4d_nodes.ApplyCVD, model=model, cameractrl=tiny_cameractrl(), cvd=tiny_cvd_module(), frames=frames,
                    **trajectories, **values)


def test_apply_cvd_gives_a_model_a_grid_latent_and_every_video_s_cameras(mv4d_nodes, sd15, video):
    model, latent, cameras = apply(mv4d_nodes, video, dict(zip(["trajectory_1", "trajectory_2", "trajectory_3"], arcs(3)))).result
    assert latent["samples"].shape == (3 * FRAMES, 4, 8, 8) and latent["mv4d_grid"] == {"views": 3, "frames": FRAMES}
    assert len(cameras) == 3 * FRAMES
    out = sample(model, sd15[1], torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == latent["samples"].shape and bool(torch.isfinite(out).all())
    decoded = run_node(mv4d_nodes.DecodeGrid, vae=sd15[2], grid_latent={**latent, "samples": out}, cameras=cameras,
                       frames_per_decode=0, preview_fps=8.0).result[0]
    assert (decoded.num_views, decoded.num_frames) == (3, FRAMES) and decoded.cameras_move  # one camera per video and frame
    assert torch.equal(decoded.cameras.world_to_camera[FRAMES:2 * FRAMES], arcs(3)[1].world_to_camera)


def test_bad_input_names_node_input_and_fix(comfy, mv4d_nodes, sd15, video):
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.integration.patches.camera_control import with_camera_control
    from test_host_nodes import write_pose_file

    first, second, third = arcs(3)
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'trajectory_2': only one trajectory is connected.*"
                                             r"Fix: connect a second camera trajectory"):
        apply(mv4d_nodes, video, {"trajectory_1": first})
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'trajectory_2': the trajectories have different lengths "
                                             r"\(trajectory_1: 4, trajectory_2: 3 cameras\).*Fix: give every trajectory 4 cameras"):
        apply(mv4d_nodes, video, {"trajectory_1": first, "trajectory_2": second.select(range(3))})
    with pytest.raises(NodeInputError, match=r"input 'trajectory_2': nothing is connected here, but trajectory_3 is"):
        apply(mv4d_nodes, video, {"trajectory_1": first, "trajectory_3": third})
    # a pose file holding fewer poses than asked for: its trajectory comes out short
    write_pose_file(__import__("pathlib").Path(comfy.get_input_directory()), "short_dolly.txt", frames=3)
    loaded = run_node(mv4d_nodes.LoadCameraTrajectory, pose_file="short_dolly.txt", width=64, height=64, source_aspect=1.7778,
                      start_frame=0, frame_stride=1, max_frames=FRAMES, relative_to_first=True).args[0]
    short = [loaded, loaded]
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'trajectory_1': 3 cameras per trajectory, but frames is 4 "
                                             r"\(a pose file with fewer poses than MV4D Load Camera Trajectory's max_frames.*"
                                             r"Fix: set frames to 3"):
        apply(mv4d_nodes, video, {"trajectory_1": short[0], "trajectory_2": short[1]})
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'model': this MODEL already has CameraCtrl applied"):
        apply(mv4d_nodes, with_camera_control(video, tiny_cameractrl(), first), {"trajectory_1": first, "trajectory_2": second})
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'model': this MODEL has no motion module"):
        apply(mv4d_nodes, sd15[0], {"trajectory_1": first, "trajectory_2": second})
    long = arcs(2, frames=17)
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'frames': 17 frames, but CameraCtrl's pose encoder holds at most 16"):
        apply(mv4d_nodes, video, {"trajectory_1": long[0], "trajectory_2": long[1]}, frames=17)
    model = apply(mv4d_nodes, video, {"trajectory_1": first, "trajectory_2": second}).result[0]
    with pytest.raises(NodeInputError, match=r"MV4D Apply CVD: input 'latent': the sampled latent has 12 items, but the "
                                             r"trajectories give 2 videos x 4 frames \(8\).*Fix: sample the latent output"):
        sample(model, sd15[1], noise_of(3))  # another node's latent: 12 items for a 2 x 4 grid
