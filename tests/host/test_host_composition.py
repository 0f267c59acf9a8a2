"""Diffusion² score composition inside ComfyUI, on tiny models of the real SVD / SV3D architectures.

Properties: with the multi-view weight at 0 every row of the grid is plain SVD sampling of that row; at 1 every
column is plain SV3D sampling of that column; chunking changes nothing; the schedule follows its formula; SV3D
azimuths follow the official convention; bad input is refused with a message naming node, input and fix.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import tiny_checkpoint

VIEWS, FRAMES, SIZE, STEPS = 4, 3, 64, 4
TOLERANCE = 1e-4  # float32 differences of batching the same UNet work differently


class FixedNoise:
    """A NOISE input that gives a tensor we chose (what RandomNoise gives, but sliceable for the comparison)."""

    def __init__(self, noise: torch.Tensor):
        self.noise, self.seed = noise, 0

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return self.noise.clone()


@pytest.fixture(scope="module")
def models(comfy):
    return {kind: tiny_checkpoint(kind) for kind in ("svd", "sv3d_p", "sv3d_u")}


@pytest.fixture(scope="module")
def cameras(mv4d_nodes):
    return run_node(mv4d_nodes.OrbitCameras, views=VIEWS, elevation=10.0, radius=2.0, fov=33.8, width=SIZE, height=SIZE,
                    start_azimuth=0.0, order="SV3D: input view last (360 deg)").result[0]


@pytest.fixture(scope="module")
def references():
    generator = torch.Generator().manual_seed(7)
    return torch.rand(VIEWS, SIZE, SIZE, 3, generator=generator), torch.rand(FRAMES, SIZE, SIZE, 3, generator=generator)


def grid_conditioning(mv4d_nodes, models, cameras, references, **overrides):
    _, clip_vision, vae = models["svd"]
    inputs = dict(clip_vision=clip_vision, vae=vae, cameras=cameras, reference_views=references[0],
                  reference_frames=references[1], fps=6, motion_bucket_id=127, video_augmentation=0.0,
                  multiview_augmentation=0.0)
    inputs.update(overrides)
    return run_node(mv4d_nodes.GridConditioningNode, **inputs).result


def composed_guider(mv4d_nodes, models, conditioning, video_model=None, multiview_model=None, **overrides):
    inputs = dict(video_model=video_model or models["svd"][0], multiview_model=multiview_model or models["sv3d_p"][0],
                  grid_conditioning=conditioning, video_cfg_first=1.5, video_cfg_last=3.0, multiview_cfg_first=2.5,
                  multiview_cfg_last=2.5, schedule="constant", multiview_weight=0.6, weight_start=1.0, weight_end=0.0,
                  logistic_k=15.0, logistic_center=0.5, per_view_weights=True, videos_per_call=0, multiview_sets_per_call=0)
    inputs.update(overrides)
    return run_node(mv4d_nodes.ComposedGuiderNode, **inputs).result[0]


def karras_sigmas(steps=STEPS):
    from comfy.k_diffusion.sampling import get_sigmas_karras

    return get_sigmas_karras(steps, 0.002, 700.0, rho=7.0)


def sample(guider, noise, latent, sampler=None, sigmas=None):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    sampler = sampler or comfy.samplers.sampler_object("euler")
    sigmas = karras_sigmas() if sigmas is None else sigmas
    inputs = dict(noise=FixedNoise(noise), guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)
    if hasattr(SamplerCustomAdvanced, "VALIDATE_CLASS"):  # a V3 node (ComfyUI 0.3.6x+ moved it over)
        return run_node(SamplerCustomAdvanced, **inputs).result[0]["samples"]
    with torch.inference_mode():
        return SamplerCustomAdvanced().sample(**inputs)[0]["samples"]


@contextmanager
def spy_on_unet_calls(before_call=None):
    """Records (model class, batch, ids of the models ComfyUI's model management holds, image-forwards: batch x
    cond passes, the calling thread's name) for every batch of UNet work; before_call(calls), if given, runs after
    the call is recorded and before it goes on."""
    import comfy.model_management
    import comfy.samplers

    calls = []
    original = comfy.samplers.calc_cond_batch

    def spy(model, conds, x, *args, **kwargs):
        loaded = {id(entry.model.model) for entry in comfy.model_management.current_loaded_models if entry.model is not None}
        calls.append((type(model).__name__, x.shape[0], loaded, x.shape[0] * sum(c is not None for c in conds),
                      threading.current_thread().name))
        if before_call:
            before_call(calls)
        return original(model, conds, x, *args, **kwargs)

    comfy.samplers.calc_cond_batch = spy
    try:
        yield calls
    finally:
        comfy.samplers.calc_cond_batch = original


def grid_noise(seed=3):
    return torch.randn(VIEWS * FRAMES, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def test_multiview_weight_zero_gives_plain_video_sampling_row_by_row(mv4d_nodes, models, cameras, references):
    from comfy_extras.nodes_video_model import SVD_img2vid_Conditioning, VideoLinearCFGGuidance
    import comfy.samplers

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = composed_guider(mv4d_nodes, models, conditioning, schedule="constant", multiview_weight=0.0, per_view_weights=False)
    noise = grid_noise()
    with spy_on_unet_calls() as calls:
        grid = sample(guider, noise, latent)
    assert all(s == 0.0 for _, _, s in guider.weights_log)
    assert {call[0] for call in calls} == {"SVD_img2vid"}  # the multi-view model, weight 0, never ran

    svd, clip_vision, vae = models["svd"]
    linear_cfg_model = VideoLinearCFGGuidance().patch(svd, 1.5)[0]  # core's per-frame linear CFG, 1.5 -> cfg
    for view in range(VIEWS):
        with torch.inference_mode():
            positive, negative, row_latent = SVD_img2vid_Conditioning().encode(
                clip_vision, references[0][view:view + 1], vae, SIZE, SIZE, FRAMES, 127, 6, 0.0)
        plain = comfy.samplers.CFGGuider(linear_cfg_model)
        plain.set_conds(positive, negative)
        plain.set_cfg(3.0)
        row = sample(plain, noise[view * FRAMES:(view + 1) * FRAMES], row_latent)
        difference = (grid[view * FRAMES:(view + 1) * FRAMES] - row).abs().max().item()
        print(f"view {view}: max |composed row - plain SVD| = {difference:.2e} (values up to {row.abs().max():.2f})")
        assert difference < TOLERANCE


def test_multiview_weight_one_gives_plain_multiview_sampling_column_by_column(mv4d_nodes, models, cameras, references):
    import comfy.samplers

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = composed_guider(mv4d_nodes, models, conditioning, schedule="constant", multiview_weight=1.0, per_view_weights=False)
    noise = grid_noise(4)
    with spy_on_unet_calls() as calls:
        grid = sample(guider, noise, latent).reshape(VIEWS, FRAMES, 4, SIZE // 8, SIZE // 8)
    assert {call[0] for call in calls} == {"SV3D_p"}

    sv3d, clip_vision, vae = models["sv3d_p"]
    _, svd_clip_vision, svd_vae = models["svd"]  # the grid conditioning above encoded with these
    for frame in range(FRAMES):
        positive, negative, column_latent = run_node(
            mv4d_nodes.SV3DConditioning, clip_vision=svd_clip_vision, init_image=references[1][frame:frame + 1],
            vae=svd_vae, cameras=cameras, augmentation_level=0.0).result
        plain = comfy.samplers.CFGGuider(sv3d)
        plain.set_conds(positive, negative)
        plain.set_cfg(2.5)
        column_noise = noise.reshape(VIEWS, FRAMES, *noise.shape[1:])[:, frame]
        column = sample(plain, column_noise, column_latent)
        difference = (grid[:, frame] - column).abs().max().item()
        print(f"frame {frame}: max |composed column - plain SV3D| = {difference:.2e}")
        assert difference < TOLERANCE


def test_chunk_sizes_do_not_change_the_grid(mv4d_nodes, models, cameras, references):
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references, video_augmentation=0.02,
                                             multiview_augmentation=1e-5)
    noise = grid_noise(5)
    grids = {}
    for per_call in (1, 2, 0, 4096):  # one video/set per call, two, as many as fit, all
        guider = composed_guider(mv4d_nodes, models, conditioning, videos_per_call=per_call, multiview_sets_per_call=per_call)
        with spy_on_unet_calls() as calls:
            grids[per_call] = sample(guider, noise, latent)
        sizes = {name: sorted({call[1] for call in calls if call[0] == name}) for name in ("SVD_img2vid", "SV3D_p")}
        expected = min(per_call or 4096, VIEWS) * FRAMES, min(per_call or 4096, FRAMES) * VIEWS
        assert max(sizes["SVD_img2vid"]) == expected[0] and max(sizes["SV3D_p"]) == expected[1], sizes
        both = {id(models["svd"][0].model), id(models["sv3d_p"][0].model)}
        assert all(both <= call[2] for call in calls)  # model management holds both while sampling
    for per_call, grid in grids.items():
        difference = (grid - grids[1]).abs().max().item()
        print(f"{per_call} per call vs 1: {difference:.2e}")
        assert difference < TOLERANCE
    assert grids[1].abs().max() > 0.1  # something was sampled


def test_models_are_loaded_for_one_video_not_the_whole_grid(mv4d_nodes, models, cameras, references, monkeypatch):
    """ComfyUI sizes a model load for the whole latent batch; the guider runs a chunk at a time, so it asks for
    the memory of one video (at real size the whole grid would force a needless low-VRAM partial load)."""
    import comfy.sampler_helpers

    seen = []
    original = comfy.sampler_helpers.estimate_memory
    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory",
                        lambda model, noise_shape, *args, **kwargs: seen.append(tuple(noise_shape)) or original(model, noise_shape, *args, **kwargs))
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    sample(composed_guider(mv4d_nodes, models, conditioning), grid_noise(), latent, sigmas=karras_sigmas(1))
    assert seen == [(FRAMES, 4, SIZE // 8, SIZE // 8)]


def test_automatic_chunks_follow_free_memory(mv4d_nodes, models, cameras, references, monkeypatch):
    import comfy.model_management
    import comfy.samplers

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    svd_model, sv3d_model = models["svd"][0].model, models["sv3d_p"][0].model
    # room for 2 videos (cond + uncond) and 3 multi-view sets (cond + uncond) per call, with ComfyUI's 1.5 margin
    room = min(svd_model.memory_required([2 * 2 * FRAMES, 4, SIZE // 8, SIZE // 8]) * 1.5 * 1.01,
               sv3d_model.memory_required([2 * 3 * VIEWS, 4, SIZE // 8, SIZE // 8]) * 1.5 * 1.01)
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda device=None, torch_free_too=False: (room, room) if torch_free_too else room)
    batches = []
    original = comfy.samplers.calc_cond_batch
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch",
                        lambda model, conds, x, *args: batches.append((type(model).__name__, x.shape[0])) or original(model, conds, x, *args))
    guider = composed_guider(mv4d_nodes, models, conditioning)
    with torch.inference_mode():
        guider.sample(grid_noise(), latent["samples"], comfy.samplers.sampler_object("euler"), karras_sigmas(1), disable_pbar=True)
    video_batches = [size for name, size in batches if name == "SVD_img2vid"]
    multiview_batches = [size for name, size in batches if name == "SV3D_p"]
    assert max(video_batches) <= 2 * FRAMES and sum(video_batches) == VIEWS * FRAMES
    assert max(multiview_batches) <= 3 * VIEWS and sum(multiview_batches) == VIEWS * FRAMES
    assert min(video_batches) < VIEWS * FRAMES  # it did split


def test_automatic_chunks_grow_to_the_measured_memory_of_earlier_calls(mv4d_nodes, models, cameras, references, monkeypatch):
    """The first automatic calls of each model are sized by ComfyUI's (worst-case) estimate and measured; later
    steps are sized by what calls really allocated. CUDA's allocator statistics are faked here as 2 kB + 10 kB per
    video / multi-view set (the GPU lane measures for real); the grid must not change."""
    import weakref

    import comfy.model_management
    import mv4d.integration.composed_guider as composed

    with spy_on_unet_calls() as calls:
        class FakePeakMemory:
            def __init__(self, device):
                self.bytes = None

            @contextmanager
            def measure(self, enabled=True):
                yield self
                if not enabled:
                    return
                name, batch = calls[-1][:2]
                self.bytes = 2_000 + 10_000 * batch // (FRAMES if name == "SVD_img2vid" else VIEWS)

        monkeypatch.setattr(composed, "PeakMemory", FakePeakMemory)
        monkeypatch.setattr(composed, "MEASURED_CALLS", weakref.WeakKeyDictionary())
        room = (2_000 + 10_000 * 2.5) / composed.FREE_MEMORY_SHARE  # 2 items fit; far below ComfyUI's estimate
        monkeypatch.setattr(comfy.model_management, "get_free_memory",
                            lambda device=None, torch_free_too=False: (room, room) if torch_free_too else room)
        conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
        noise = grid_noise(4)
        grid = sample(composed_guider(mv4d_nodes, models, conditioning), noise, latent, sigmas=karras_sigmas(3))
    video = [call[1] // FRAMES for call in calls if call[0] == "SVD_img2vid"]
    multiview = [call[1] // VIEWS for call in calls if call[0] == "SV3D_p"]
    # step 1: one per call (ComfyUI's estimate); step 2: 12 kB per item measured -> 2 fit; step 3: the line says 2
    assert video == [1] * VIEWS + [2, 2] + [2, 2], video
    assert multiview == [1] * FRAMES + [2, 1] + [2, 1], multiview
    assert [memory.peak_bytes for memory in composed.MEASURED_CALLS[models["svd"][0].model].values()] == [{1: 12_000, 2: 22_000}]
    one_per_call = sample(composed_guider(mv4d_nodes, models, conditioning, videos_per_call=1, multiview_sets_per_call=1),
                          noise, latent, sigmas=karras_sigmas(3))
    assert (grid - one_per_call).abs().max() < TOLERANCE


def test_alternate_models_runs_one_model_per_evaluation(mv4d_nodes, models, cameras, references):
    """The optional speed-up: after the first evaluation each one runs only one model, in turn, and reuses the
    other's previous prediction. With a single model active it changes nothing."""
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    noise, all_at_once = grid_noise(8), dict(videos_per_call=4096, multiview_sets_per_call=4096)
    runs = {}
    for alternate in (False, True):
        guider = composed_guider(mv4d_nodes, models, conditioning, alternate_models=alternate, **all_at_once)
        with spy_on_unet_calls() as calls:
            runs[alternate] = sample(guider, noise, latent)
        runs[alternate, "models"] = [call[0] for call in calls]
    assert runs[False, "models"] == ["SVD_img2vid", "SV3D_p"] * STEPS
    assert runs[True, "models"] == ["SVD_img2vid", "SV3D_p", "SV3D_p", "SVD_img2vid", "SV3D_p"][:STEPS + 1]
    assert torch.isfinite(runs[True]).all() and not torch.allclose(runs[True], runs[False], atol=1e-3)
    video_only = dict(schedule="constant", multiview_weight=0.0, per_view_weights=False, **all_at_once)
    plain, alternated = (sample(composed_guider(mv4d_nodes, models, conditioning, alternate_models=alternate, **video_only),
                                noise, latent) for alternate in (False, True))
    assert torch.equal(plain, alternated)


def test_guidance_interval_skips_the_unconditional_pass_outside_it(mv4d_nodes, models, cameras, references):
    """The optional speed-up: outside [guidance_sigma_min, max] a step runs cond only, exactly CFG 1 there."""
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    noise, sigmas = grid_noise(6), karras_sigmas()
    low_noise = float(sigmas[2]) * 1.01  # guide only the last two steps
    runs = {}
    for name, settings in {
        "interval": dict(guidance_sigma_min=0.0, guidance_sigma_max=low_noise),
        "no cfg": dict(video_cfg_first=1.0, video_cfg_last=1.0, multiview_cfg_first=1.0, multiview_cfg_last=1.0),
        "every step": dict(guidance_sigma_min=0.0, guidance_sigma_max=1000.0),
        "never": dict(guidance_sigma_min=0.0, guidance_sigma_max=1e-4),  # below the last sigma, 0.002
    }.items():
        guider = composed_guider(mv4d_nodes, models, conditioning, videos_per_call=4096, multiview_sets_per_call=4096, **settings)
        with spy_on_unet_calls() as calls:
            runs[name] = (sample(guider, noise, latent, sigmas=sigmas), sum(call[3] for call in calls))
    forwards = {name: count for name, (_, count) in runs.items()}
    print(f"UNet image-forwards over {STEPS} steps: {forwards}")
    grid = VIEWS * FRAMES
    assert forwards["every step"] == STEPS * 2 * 2 * grid  # steps x models x (cond + uncond) x cells
    assert forwards["no cfg"] == STEPS * 2 * grid
    assert forwards["interval"] == forwards["no cfg"] + 2 * 2 * grid  # the two guided steps add their uncond
    assert not torch.equal(runs["interval"][0], runs["every step"][0])
    assert torch.equal(runs["never"][0], runs["no cfg"][0])  # unguided steps are exactly CFG 1
    message = error_of(lambda: composed_guider(mv4d_nodes, models, conditioning, guidance_sigma_min=5.0, guidance_sigma_max=1.0))
    assert "'guidance_sigma_min'" in message


def test_schedule_values_at_each_step_follow_the_formula(mv4d_nodes, models, cameras, references):
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    steps, k, center = 6, 20.0, 0.5
    guider = composed_guider(mv4d_nodes, models, conditioning, schedule="logistic", logistic_k=k, logistic_center=center,
                             weight_start=1.0, weight_end=0.0, videos_per_call=4096, multiview_sets_per_call=4096)
    rollback = run_node(mv4d_nodes.RollbackEuler, rollback_steps=2).result[0]
    sigmas = karras_sigmas(steps)
    sample(guider, grid_noise(), latent, sampler=rollback, sigmas=sigmas)
    logged_steps = [step for step, _, _ in guider.weights_log]
    assert logged_steps == [0, 0, 1, 1, 2, 3, 4, 5]  # rollback evaluates the first 2 steps twice
    for step, sigma, s in guider.weights_log:
        assert sigma == pytest.approx(float(sigmas[step]), rel=1e-5)
        x = step / (steps - 1)
        assert s == pytest.approx(1 - 1 / (1 + math.exp(-k * (x - center))), abs=1e-12)
    values = [s for _, _, s in guider.weights_log]
    assert values[0] > 0.99 and values[-1] < 0.01 and all(a >= b for a, b in zip(values, values[1:]))


def test_sv3d_conditioning_follows_the_official_azimuths(mv4d_nodes, models):
    """Official: azimuths linspace(0, 360, 22)[1:], input view last at 2 pi (ComfyUI's own node starts at 0)."""
    import comfy.sampler_helpers
    import comfy.samplers
    from comfy_extras.nodes_stable3d import SV3D_Conditioning

    sv3d, clip_vision, vae = models["sv3d_p"]
    rig = run_node(mv4d_nodes.OrbitCameras, views=21, elevation=10.0, radius=2.0, fov=33.8, width=SIZE, height=SIZE,
                   start_azimuth=0.0, order="SV3D: input view last (360 deg)").result[0]
    image = torch.rand(1, SIZE, SIZE, 3)
    positive, _, latent = run_node(mv4d_nodes.SV3DConditioning, clip_vision=clip_vision, init_image=image, vae=vae,
                                   cameras=rig, augmentation_level=0.0).result
    azimuths = positive[0][1]["azimuth"]
    official = [360.0 * (v + 1) / 21 for v in range(21)]
    assert azimuths == pytest.approx(official, abs=1e-4)
    assert positive[0][1]["elevation"] == pytest.approx([10.0] * 21, abs=1e-6)
    assert latent["samples"].shape == (21, 4, SIZE // 8, SIZE // 8)
    core_positive = run_node(SV3D_Conditioning, clip_vision=clip_vision, init_image=image, vae=vae, width=SIZE,
                             height=SIZE, video_frames=21, elevation=10.0).result[0]
    assert core_positive[0][1]["azimuth"][0] == 0.0  # core puts the input view's azimuth first: not the official order

    # what the model embeds for the input view is the official 2 pi, not ComfyUI's fmod(360, 360) = 0
    conds = comfy.samplers.process_conds(sv3d.model, torch.zeros(21, 4, SIZE // 8, SIZE // 8),
                                         {"positive": comfy.sampler_helpers.convert_cond(positive)}, "cpu")
    adm = conds["positive"][0]["model_conds"]["y"].cond
    two_pi = sv3d.model.embedder_512(torch.tensor([2 * math.pi]))
    zero = sv3d.model.embedder_512(torch.tensor([0.0]))
    assert (adm[-1, -512:] - two_pi[0]).abs().max() < 1e-3
    assert (adm[-1, -512:] - zero[0]).abs().max() > 0.5


def test_the_guider_works_with_sv3d_u_too(mv4d_nodes, models, cameras, references):
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = composed_guider(mv4d_nodes, models, conditioning, multiview_model=models["sv3d_u"][0])
    grid = sample(guider, grid_noise(), latent)
    assert grid.shape == (VIEWS * FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(grid).all()


def test_decode_grid_gives_a_multiview_video_and_a_mosaic(mv4d_nodes, models, cameras):
    _, _, vae = models["svd"]
    latent = {"samples": grid_noise() * 0.5, "mv4d_grid": {"views": VIEWS, "frames": FRAMES}}
    output = run_node(mv4d_nodes.DecodeGrid, vae=vae, grid_latent=latent, cameras=cameras, frames_per_decode=0, preview_fps=8.0)
    video, tiles = output.result
    assert video.images.shape == (VIEWS, FRAMES, SIZE, SIZE, 3)
    direct = vae.decode(latent["samples"][FRAMES:2 * FRAMES])  # row 1 decoded on its own
    assert (video.images[1] - direct).abs().max() < 1e-5
    assert tiles.shape == (FRAMES, 2 * SIZE, 2 * SIZE, 3)  # 4 views tiled 2 x 2
    assert (tiles[2, :SIZE, SIZE:] - video.images[1, 2]).abs().max() < 1e-6
    assert output.ui.as_dict()["images"]


def test_a_temporal_decoder_decodes_each_row_on_its_own(mv4d_nodes):
    """SVD's VAE mixes frames in its decoder: rows must be decoded separately (and chunked as asked)."""
    import comfy.sd
    from mv4d.integration.grid_latent import has_temporal_decoder
    from mv4d_tiny_models import init_weights

    # ComfyUI builds SVD's VAE (full size, temporal decoder) when it sees this key; random weights, tiny images
    vae = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)})
    init_weights(vae.first_stage_model, 11)
    assert has_temporal_decoder(vae)
    views, frames = 2, 3
    rig = run_node(mv4d_nodes.OrbitCameras, views=views, elevation=10.0, radius=2.0, fov=33.8, width=32, height=32,
                   start_azimuth=0.0, order="SV3D: input view last (360 deg)").result[0]
    latent = {"samples": torch.randn(views * frames, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5}
    whole_rows = run_node(mv4d_nodes.DecodeGrid, vae=vae, grid_latent=latent, cameras=rig, frames_per_decode=0,
                          preview_fps=8.0).result[0]
    one_frame_at_a_time = run_node(mv4d_nodes.DecodeGrid, vae=vae, grid_latent=latent, cameras=rig, frames_per_decode=1,
                                   preview_fps=8.0).result[0]
    with torch.inference_mode():
        row = vae.decode(latent["samples"][frames:])
        together = vae.decode(latent["samples"])[frames:]
        single = vae.decode(latent["samples"][frames:frames + 1])
    assert (whole_rows.images[1] - row).abs().max() < 1e-5
    assert (together - row).abs().max() > 1e-3  # decoding all views as one clip would have mixed them
    assert (one_frame_at_a_time.images[1, 0] - single[0]).abs().max() < 1e-5
    assert (single[0] - row[0]).abs().max() > 1e-3  # and chunking is what changed it


# Bad input.

def error_of(call) -> str:
    with pytest.raises(Exception) as caught:
        call()
    return str(caught.value)


def test_swapped_or_unsupported_models_are_refused(mv4d_nodes, models, cameras, references):
    conditioning, _ = grid_conditioning(mv4d_nodes, models, cameras, references)
    svd, sv3d = models["svd"][0], models["sv3d_p"][0]
    message = error_of(lambda: composed_guider(mv4d_nodes, models, conditioning, video_model=sv3d, multiview_model=svd))
    assert "MV4D Composed Guider" in message and "'video_model'" in message and "swap" in message
    message = error_of(lambda: composed_guider(mv4d_nodes, models, conditioning, video_model=svd, multiview_model=svd))
    assert "'multiview_model'" in message and "video model" in message
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    patched = VideoLinearCFGGuidance().patch(svd, 1.0)[0]
    message = error_of(lambda: composed_guider(mv4d_nodes, models, conditioning, video_model=patched))
    assert "CFG patch" in message and "'video_model'" in message


def test_a_latent_of_another_grid_shape_is_refused(mv4d_nodes, models, cameras, references):
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = composed_guider(mv4d_nodes, models, conditioning)
    wrong = {"samples": latent["samples"][:-FRAMES]}
    message = error_of(lambda: sample(guider, grid_noise()[:-FRAMES], wrong))
    assert "MV4D Composed Guider" in message and "'latent_image'" in message and "4 views x 3 frames" in message
    three_views = run_node(mv4d_nodes.OrbitCameras, views=3, elevation=10.0, radius=2.0, fov=33.8, width=SIZE,
                           height=SIZE, start_azimuth=0.0, order="SV3D: input view last (360 deg)").result[0]
    message = error_of(lambda: run_node(mv4d_nodes.DecodeGrid, vae=models["svd"][2], grid_latent=latent,
                                        cameras=three_views, frames_per_decode=0, preview_fps=8.0))
    assert "MV4D Decode Grid" in message and "'grid_latent'" in message


def test_reference_images_of_the_wrong_count_or_size_are_refused(mv4d_nodes, models, cameras, references):
    views, frames = references
    message = error_of(lambda: grid_conditioning(mv4d_nodes, models, cameras, (views[:3], frames)))
    assert "MV4D Grid Conditioning" in message and "'reference_views'" in message and "3 images" in message
    message = error_of(lambda: grid_conditioning(mv4d_nodes, models, cameras, (views, frames[:, :32])))
    assert "'reference_frames'" in message and "64x64" in message


def test_sigmas_that_do_not_descend_are_refused(mv4d_nodes, models, cameras, references):
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    guider = composed_guider(mv4d_nodes, models, conditioning)
    rollback = run_node(mv4d_nodes.RollbackEuler, rollback_steps=2).result[0]
    message = error_of(lambda: sample(guider, grid_noise(), latent, sampler=rollback, sigmas=karras_sigmas().flip(0)))
    assert "'sigmas'" in message and "decrease" in message


def test_fp8_matmuls_wrap_the_unet_forward_and_refuse_gpus_without_fp8(mv4d_nodes, models, cameras, references, monkeypatch):
    """MV4D FP8 Matmuls puts the fp8 function mode around each UNet forward of the model it patches (on the CPU it
    routes nothing, so the grid is unchanged); on a device without fp8 tensor cores the node itself refuses."""
    import mv4d.integration.patches.fp8_matmuls as fp8_node
    from mv4d.nodes.speed import Fp8MatmulsNode
    from mv4d_tiny_models import record_fp8_modes

    modes = record_fp8_modes(monkeypatch)
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    noise, all_at_once = grid_noise(9), dict(videos_per_call=4096, multiview_sets_per_call=4096)
    plain = sample(composed_guider(mv4d_nodes, models, conditioning, **all_at_once), noise, latent, sigmas=karras_sigmas(2))
    assert not modes
    patched = fp8_node.with_fp8_matmuls(models["sv3d_p"][0])
    wrapped = sample(composed_guider(mv4d_nodes, models, conditioning, multiview_model=patched, **all_at_once), noise, latent,
                     sigmas=karras_sigmas(2))
    assert len(modes) == 2  # one multi-view forward per step (cond and uncond batched); none for the video model
    assert all(mode.skipped > 0 and mode.routed == 0 for mode in modes)  # it saw the linear layers, ran none in fp8
    assert torch.equal(plain, wrapped)
    assert not models["sv3d_p"][0].get_wrappers("diffusion_model", fp8_node.WRAPPER_KEY)  # the loader's model is untouched
    message = error_of(lambda: run_node(Fp8MatmulsNode, model=models["svd"][0]))
    assert message.startswith("MV4D FP8 Matmuls: input 'model'") and "fp8 tensor cores" in message and "Fix: bypass" in message


def test_an_automatic_call_that_runs_out_of_memory_is_split_and_redone(mv4d_nodes, models, cameras, references, monkeypatch):
    """What the measurement cannot foresee (allocator fragmentation, another program): a call of more than two
    videos "runs out of memory" here. It is halved and redone, later calls stay below it, the grid is unchanged;
    a single video that runs out of memory is the user's error to see."""
    import weakref

    import comfy.samplers
    import mv4d.integration.composed_guider as composed

    monkeypatch.setattr(composed, "MEASURED_CALLS", weakref.WeakKeyDictionary())
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    noise = grid_noise(10)
    one_per_call = sample(composed_guider(mv4d_nodes, models, conditioning, videos_per_call=1, multiview_sets_per_call=1),
                          noise, latent, sigmas=karras_sigmas(2))
    limit = {"videos": 2}
    original = comfy.samplers.calc_cond_batch

    def small_card(model, conds, x, *args, **kwargs):
        if type(model).__name__ == "SVD_img2vid" and x.shape[0] > limit["videos"] * FRAMES:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.16 GiB (simulated)")
        return original(model, conds, x, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", small_card)
    with spy_on_unet_calls() as calls:
        grid = sample(composed_guider(mv4d_nodes, models, conditioning), noise, latent, sigmas=karras_sigmas(2))
    video = [call[1] // FRAMES for call in calls if call[0] == "SVD_img2vid"]
    assert video == [4, 2, 2, 2, 2], video  # all 4 rows fail, 2 + 2 redone; step 2 stays below 4 (balanced: 2 + 2)
    assert (grid - one_per_call).abs().max() < TOLERANCE
    limit["videos"] = 0
    message = error_of(lambda: sample(composed_guider(mv4d_nodes, models, conditioning), noise, latent, sigmas=karras_sigmas(2)))
    assert "out of memory" in message
