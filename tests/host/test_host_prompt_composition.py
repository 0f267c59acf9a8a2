"""Diffusion² for the text pair: AnimateDiff (an SD1.5 model with a v2 motion module) on the rows and MVDream 1.5 on
the columns, through the nodes, on tiny models of the real layouts.

Properties: with the multi-view weight at 0 every row is plain AnimateDiff sampling of that row; at 1 every column
is plain MVDream sampling of that column; chunking changes nothing; reference cells stay exactly as given and the
rows / columns made of them only are not evaluated; each model is evaluated only at noise levels of its own
schedule (AnimateDiff's sqrt_linear reaches sigma 25.1, MVDream's LDM linear 14.6); the prediction spaces are read
from the models; bad input (a pair that cannot be combined, a grid that does not match the latent or the
conditioning, the wrong models) is refused with a message naming node, input and fix.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import tiny_motion_module, tiny_multiview_model, tiny_sd15_checkpoint
from test_host_composition import FixedNoise, error_of

VIEWS, FRAMES, SIZE, STEPS = 4, 3, 64, 3
LATENT = SIZE // 8
# float32 differences of batching the same UNet work differently, relative to the largest value: the tiny eps
# models' random weights make x0 = x - sigma * eps reach hundreds at AnimateDiff's sigma 25
TOLERANCE = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    difference = (a - b).abs().max().item()
    return difference < TOLERANCE * max(1.0, b.abs().max().item()), difference
CFG = 7.5


@pytest.fixture(scope="module")
def parts(comfy):
    from mv4d.integration.patches.motion import with_motion

    with torch.inference_mode():  # as ComfyUI loads models
        sd15, sd_clip, sd_vae = tiny_sd15_checkpoint()
        animatediff = with_motion(sd15, tiny_motion_module("v2"))
        mvdream, mv_clip, mv_vae, _ = tiny_multiview_model("mvdream-sd15")
    return {"animatediff": animatediff, "sd_clip": sd_clip, "vae": sd_vae, "mvdream": mvdream, "mv_clip": mv_clip}


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@pytest.fixture(scope="module")
def prompts(parts):
    return {"video_positive": encode(parts["sd_clip"], "a fox running"), "video_negative": encode(parts["sd_clip"], ""),
            "multiview_positive": encode(parts["mv_clip"], "a fox running"), "multiview_negative": encode(parts["mv_clip"], "")}


@pytest.fixture(scope="module")
def cameras(mv4d_nodes):
    return run_node(mv4d_nodes.OrbitCameras, views=VIEWS, elevation=15.0, radius=2.0, fov=33.8, width=SIZE, height=SIZE,
                    start_azimuth=0.0, order="input view first").result[0]


def prompt_grid(mv4d_nodes, parts, prompts, cameras, **overrides):
    inputs = dict(video_model=parts["animatediff"], multiview_model=parts["mvdream"], **prompts, cameras=cameras,
                  views=VIEWS, width=SIZE, height=SIZE, frames=FRAMES)
    inputs.update(overrides)
    return run_node(mv4d_nodes.PromptGridConditioningNode, **inputs).result


def composed_guider(mv4d_nodes, parts, conditioning, **overrides):
    inputs = dict(video_model=parts["animatediff"], multiview_model=parts["mvdream"], grid_conditioning=conditioning,
                  video_cfg_first=CFG, video_cfg_last=CFG, multiview_cfg_first=CFG, multiview_cfg_last=CFG,
                  schedule="constant", multiview_weight=0.6, weight_start=1.0, weight_end=0.0, logistic_k=15.0,
                  logistic_center=0.5, per_view_weights=True, videos_per_call=0, multiview_sets_per_call=0)
    inputs.update(overrides)
    return run_node(mv4d_nodes.ComposedGuiderNode, **inputs)


def schedule_of(model, steps=STEPS):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)


def inside_both(steps=STEPS):
    """Karras sigmas below both models' sigma_max: the sampler's first noise is then scaled the same way (sigma,
    not sqrt(1 + sigma^2)) whichever model's schedule decides what full noise is."""
    from comfy.k_diffusion.sampling import get_sigmas_karras

    return get_sigmas_karras(steps, 0.0292, 10.0, rho=7.0)


def sample(guider, noise, latent, sigmas, sampler="euler"):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    inputs = dict(noise=FixedNoise(noise), guider=guider, sampler=comfy.samplers.sampler_object(sampler), sigmas=sigmas,
                  latent_image=latent)
    if hasattr(SamplerCustomAdvanced, "VALIDATE_CLASS"):  # a V3 node (ComfyUI 0.3.6x+ moved it over)
        return run_node(SamplerCustomAdvanced, **inputs).result[0]["samples"]
    with torch.inference_mode():
        return SamplerCustomAdvanced().sample(**inputs)[0]["samples"]


def plain(model, positive, negative, noise, latent, sigmas):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    return sample(guider, noise, latent, sigmas)


def grid_noise(seed=3):
    return torch.randn(VIEWS * FRAMES, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def unet_calls(parts, monkeypatch):
    """(which model, batch, sigma) of every batch of UNet work."""
    import comfy.samplers

    calls = []
    original = comfy.samplers.calc_cond_batch

    def spy(model, conds, x, timestep, *args, **kwargs):
        calls.append((id(model), x.shape[0], float(timestep.max())))
        return original(model, conds, x, timestep, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
    names = {id(parts["animatediff"].model): "animatediff", id(parts["mvdream"].model): "mvdream"}
    return calls, names


def test_multiview_weight_zero_gives_plain_animatediff_sampling_row_by_row(mv4d_nodes, parts, prompts, cameras, unet_calls):
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    guider = composed_guider(mv4d_nodes, parts, conditioning, multiview_weight=0.0, per_view_weights=False).result[0]
    noise, sigmas = grid_noise(), schedule_of(parts["animatediff"])  # AnimateDiff's own schedule, up to sigma 25.1
    grid = sample(guider, noise, latent, sigmas)
    calls, names = unet_calls
    assert {names[c[0]] for c in calls} == {"animatediff"}  # the multi-view model, weight 0, never ran
    for view in range(VIEWS):
        rows = slice(view * FRAMES, (view + 1) * FRAMES)
        row = plain(parts["animatediff"], prompts["video_positive"], prompts["video_negative"], noise[rows],
                    {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}, sigmas)
        same, difference = close(grid[rows], row)
        print(f"view {view}: max |composed row - plain AnimateDiff| = {difference:.2e} (values up to {row.abs().max():.2f})")
        assert same
    assert grid.abs().max() > 0.1


def test_multiview_weight_one_gives_plain_mvdream_sampling_column_by_column(mv4d_nodes, parts, prompts, cameras, unet_calls):
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    guider = composed_guider(mv4d_nodes, parts, conditioning, multiview_weight=1.0, per_view_weights=False).result[0]
    noise, sigmas = grid_noise(4), inside_both()
    grid = sample(guider, noise, latent, sigmas).reshape(VIEWS, FRAMES, 4, LATENT, LATENT)
    calls, names = unet_calls
    assert {names[c[0]] for c in calls} == {"mvdream"}
    positive, negative, column_latent, _ = run_node(
        mv4d_nodes.MultiviewConditioning, model=parts["mvdream"], positive=prompts["multiview_positive"],
        negative=prompts["multiview_negative"], cameras=cameras, views=VIEWS, width=SIZE, height=SIZE, frames=1).result
    for frame in range(FRAMES):
        column_noise = noise.reshape(VIEWS, FRAMES, *noise.shape[1:])[:, frame]
        column = plain(parts["mvdream"], positive, negative, column_noise, column_latent, sigmas)
        same, difference = close(grid[:, frame], column)
        print(f"frame {frame}: max |composed column - plain MVDream| = {difference:.2e} (values up to {column.abs().max():.2f})")
        assert same


def references(seed=11):
    generator = torch.Generator().manual_seed(seed)
    column = torch.randn(VIEWS, 4, LATENT, LATENT, generator=generator) * 20
    row = torch.randn(FRAMES, 4, LATENT, LATENT, generator=generator) * 20
    row[0] = column[0]  # as MV4D Reference Row Latent + KSampler make it
    return {"samples": column, "mv4d_grid": {"views": VIEWS, "frames": 1}}, {"samples": row}


def test_chunk_sizes_do_not_change_the_grid(mv4d_nodes, parts, prompts, cameras, unet_calls):
    column, row = references()
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras, reference_column=column, reference_row=row)
    noise, sigmas = grid_noise(5), schedule_of(parts["mvdream"])
    calls, names = unet_calls
    grids = {}
    for per_call in (1, 2, 0, 4096):  # one video / set per call, two, as many as fit, all
        guider = composed_guider(mv4d_nodes, parts, conditioning, videos_per_call=per_call,
                                 multiview_sets_per_call=per_call).result[0]
        calls.clear()
        grids[per_call] = sample(guider, noise, latent, sigmas)
        sizes = {name: max(c[1] for c in calls if names[c[0]] == name) for name in ("animatediff", "mvdream")}
        # rows 1..V-1 and columns 1..F-1: the reference row and column are not evaluated
        assert sizes == {"animatediff": min(per_call or 4096, VIEWS - 1) * FRAMES,
                         "mvdream": min(per_call or 4096, FRAMES - 1) * VIEWS}, sizes
    for per_call, grid in grids.items():
        same, difference = close(grid, grids[1])
        print(f"{per_call} per call vs 1: {difference:.2e} (values up to {grids[1].abs().max():.2f})")
        assert same
    assert grids[1].abs().max() > 0.1


def test_reference_cells_stay_as_given_and_condition_the_rest(mv4d_nodes, parts, prompts, cameras, unet_calls):
    column, row = references()
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras, reference_column=column, reference_row=row)
    mask = latent["noise_mask"].reshape(VIEWS, FRAMES, LATENT, LATENT)
    assert (mask[0] == 0).all() and (mask[:, 0] == 0).all() and (mask[1:, 1:] == 1).all()
    noise, sigmas = grid_noise(6), schedule_of(parts["mvdream"])
    guider = composed_guider(mv4d_nodes, parts, conditioning, videos_per_call=4096, multiview_sets_per_call=4096).result[0]
    calls, names = unet_calls
    grid = sample(guider, noise, latent, sigmas).reshape(VIEWS, FRAMES, 4, LATENT, LATENT)
    assert (grid[:, 0] - column["samples"]).abs().max() < 1e-5  # the reference column: frame 0 of every row
    assert (grid[0] - row["samples"]).abs().max() < 1e-5  # the reference row: view 0 of every column
    # per evaluation: rows 1..3 (3 x 3 frames) and columns 1..2 (2 x 4 views)
    assert sorted({(names[c[0]], c[1]) for c in calls}) == [("animatediff", (VIEWS - 1) * FRAMES), ("mvdream", (FRAMES - 1) * VIEWS)]
    free, _, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    unreferenced = sample(composed_guider(mv4d_nodes, parts, free, videos_per_call=4096, multiview_sets_per_call=4096).result[0],
                          noise, {"samples": torch.zeros(VIEWS * FRAMES, 4, LATENT, LATENT)}, sigmas)
    change = (grid[1:, 1:] - unreferenced.reshape(VIEWS, FRAMES, 4, LATENT, LATENT)[1:, 1:]).abs().max().item()
    print(f"cells off the references, with vs without them: max |difference| {change:.3f}")
    assert change > 10 * TOLERANCE * unreferenced.abs().max()  # ten times the float tolerance: the models saw them


def test_the_reference_row_latent_keeps_the_column_view_0_as_its_first_frame(mv4d_nodes, parts, prompts):
    import comfy.sample

    column, _ = references()
    latent = run_node(mv4d_nodes.ReferenceRowLatent, reference_column=column, frames=FRAMES).result[0]
    assert torch.equal(latent["samples"][0], column["samples"][0]) and not latent["samples"][1:].any()
    assert latent["noise_mask"].shape == (FRAMES, LATENT, LATENT) and not latent["noise_mask"][0].any() and latent["noise_mask"][1:].all()
    with torch.inference_mode():  # what core KSampler does with it
        row = comfy.sample.sample(parts["animatediff"], grid_noise()[:FRAMES], STEPS, CFG, "euler", "karras",
                                  prompts["video_positive"], prompts["video_negative"], latent["samples"],
                                  noise_mask=latent["noise_mask"], seed=0, disable_pbar=True)
    assert (row[0] - column["samples"][0]).abs().max() < 1e-5 and (row[1:] - latent["samples"][1:]).abs().max() > 0.1
    message = error_of(lambda: run_node(mv4d_nodes.ReferenceRowLatent, frames=FRAMES,
                                        reference_column={"samples": column["samples"], "mv4d_grid": {"views": 2, "frames": 2}}))
    assert message.startswith("MV4D Reference Row Latent: input 'reference_column'")


def test_each_model_runs_only_at_noise_levels_of_its_own_schedule(mv4d_nodes, parts, prompts, cameras, unet_calls, caplog):
    """AnimateDiff's schedule (sqrt_linear) reaches sigma 25.1, MVDream's (LDM linear) 14.6: on AnimateDiff's
    sigmas the steps above 14.6 are AnimateDiff's alone; sigmas no model knows are refused."""
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    sigmas = schedule_of(parts["animatediff"], 6)
    guider = composed_guider(mv4d_nodes, parts, conditioning, videos_per_call=4096, multiview_sets_per_call=4096).result[0]
    calls, names = unet_calls
    with caplog.at_level(logging.WARNING):
        sample(guider, grid_noise(7), latent, sigmas)
    above = [i for i, s in enumerate(sigmas[:-1].tolist()) if s > 14.62]
    assert above and "lie outside the multi-view model's noise levels" in caplog.text
    for step, sigma in enumerate(sigmas[:-1].tolist()):
        ran = sorted({names[c[0]] for c in calls if abs(c[2] - sigma) < 1e-4 * sigma})
        assert ran == (["animatediff"] if step in above else ["animatediff", "mvdream"]), (step, sigma, ran)
    message = error_of(lambda: sample(guider, grid_noise(7), latent, torch.tensor([700.0, 10.0, 0.0])))
    assert "'sigmas'" in message and "outside the noise levels every composed model was trained on" in message


def test_prediction_spaces_are_read_from_the_models_and_shown_by_the_guider(mv4d_nodes, parts, prompts, cameras, comfy):
    from mv4d.integration.composition_roles import prediction_space
    from mv4d_tiny_models import tiny_checkpoint

    animatediff, mvdream = prediction_space(parts["animatediff"]), prediction_space(parts["mvdream"])
    svd = prediction_space(tiny_checkpoint("svd")[0])
    assert (animatediff.prediction, animatediff.schedule) == ("eps", "sqrt_linear")
    assert (mvdream.prediction, mvdream.schedule) == ("eps", "LDM linear")
    assert (svd.prediction, svd.schedule) == ("v", "EDM") and (svd.sigma_min, svd.sigma_max) == pytest.approx((0.002, 700.0))
    assert animatediff.sigma_max == pytest.approx(25.146, abs=1e-3) and mvdream.sigma_max == pytest.approx(14.615, abs=1e-3)
    assert animatediff.sigma_min == pytest.approx(mvdream.sigma_min) == pytest.approx(0.02917, abs=1e-5)
    assert animatediff.latents == mvdream.latents == svd.latents
    conditioning, _, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    text = composed_guider(mv4d_nodes, parts, conditioning).ui.as_dict()["text"][0]
    print(text)
    assert "rows: video model, eps, sqrt_linear" in text and "columns: multi-view model, eps, LDM linear" in text
    assert "sigma 0.02917..14.61" in text


def test_3d_aware_denoising_wraps_the_text_pair_with_its_references(mv4d_nodes, parts, prompts, cameras):
    """VideoMV's wrapper reads the grid from the composed guider: with blend weight 0 the grid is exactly the
    guider's alone (the fits run), with weight 1 it changes off the references, which stay as given."""
    column, row = references()
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras, reference_column=column, reference_row=row)
    guider = composed_guider(mv4d_nodes, parts, conditioning, videos_per_call=4096, multiview_sets_per_call=4096).result[0]
    noise, sigmas = grid_noise(9), schedule_of(parts["mvdream"])

    def aware(weight):
        return run_node(mv4d_nodes.AwareDenoising, guider=guider, vae=parts["vae"], cameras=cameras, steps="1", fit_iterations=10,
                        blend_weight=weight, fit_resolution=32, initial_gaussians=300, sigma_min=0.0, sigma_max=1000.0,
                        background="white", frames_per_decode=0).result[0]

    alone = sample(guider, noise, latent, sigmas)
    silent = aware(0.0)
    assert torch.equal(sample(silent, noise, latent, sigmas), alone) and [r.step for r in silent.mv4d_3d_aware.steps] == [1]
    blended = sample(aware(1.0), noise, latent, sigmas).reshape(VIEWS, FRAMES, 4, LATENT, LATENT)
    assert (blended[1:, 1:] - alone.reshape(VIEWS, FRAMES, 4, LATENT, LATENT)[1:, 1:]).abs().max() > 1e-3
    assert (blended[:, 0] - column["samples"]).abs().max() < 1e-5 and (blended[0] - row["samples"]).abs().max() < 1e-5


# Bad input.

def test_pairs_whose_predictions_cannot_be_combined_are_refused(mv4d_nodes, parts, prompts, cameras):
    import comfy.latent_formats
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    conditioning, _, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    flow = ModelSamplingSD3().patch(parts["mvdream"], 3.0)[0]  # a rectified-flow sampling on MVDream
    message = error_of(lambda: composed_guider(mv4d_nodes, parts, conditioning, multiview_model=flow))
    assert message.startswith("MV4D Composed Guider: input 'multiview_model': sigma means another noise level")
    assert "(1 - sigma) * x0" in message and "Fix: remove the sampling patch" in message
    other_latents = parts["mvdream"].clone()
    other_latents.add_object_patch("latent_format", comfy.latent_formats.SDXL())
    message = error_of(lambda: composed_guider(mv4d_nodes, parts, conditioning, multiview_model=other_latents))
    assert "input 'multiview_model': its latents are SDXL" in message and "no image for the other" in message


def test_a_grid_that_does_not_match_the_latent_or_the_conditioning_is_refused(mv4d_nodes, parts, prompts, cameras):
    conditioning, latent, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    guider = composed_guider(mv4d_nodes, parts, conditioning).result[0]
    more_frames = torch.zeros(VIEWS * (FRAMES + 1), 4, LATENT, LATENT)
    message = error_of(lambda: sample(guider, more_frames, {"samples": more_frames}, schedule_of(parts["mvdream"])))
    assert "'latent_image'" in message and "4 views x 3 frames" in message
    assert "the video model denoises 4 rows of 3 latents" in message and "the multi-view model denoises 3 columns of 4 latents" in message
    assert "MV4D Prompt Grid Conditioning" in message
    # the multi-view role's conditioning holds 12 cameras (4 views x 3 frames); a grid of 4 frames needs 16
    four_frames = dataclasses.replace(conditioning, frames=FRAMES + 1)
    message = error_of(lambda: composed_guider(mv4d_nodes, parts, four_frames))
    assert message.startswith("MV4D Composed Guider: input 'grid_conditioning': the multi-view model's conditioning has 12 "
                              "'mv4d_camera' rows but the grid is 4 views x 4 frames (16 cells)")
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, reference_column={"samples": torch.zeros(3, 4, LATENT, LATENT)}))
    assert "input 'reference_column'" in message and "4 views" in message
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, reference_row={"samples": torch.zeros(FRAMES, 4, 4, 4)}))
    assert "input 'reference_row'" in message and "3 frames of 64x64 px" in message
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, frames=33))
    assert "input 'frames'" in message and "holds 32" in message


def test_models_of_the_wrong_kind_or_pair_are_refused(mv4d_nodes, parts, prompts, cameras):
    from mv4d.integration.patches.motion import with_motion
    from mv4d_tiny_models import tiny_checkpoint

    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, video_model=parts["mvdream"],
                                           multiview_model=parts["animatediff"]))
    assert message.startswith("MV4D Prompt Grid Conditioning: input 'video_model': this is a multi-view model (MVDream")
    assert "swap the two model inputs: it belongs in 'multiview_model'" in message
    with torch.inference_mode():
        composite = with_motion(parts["mvdream"], tiny_motion_module("v2"))  # Vivid-ZOO's naive composite
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, multiview_model=composite))
    assert "input 'multiview_model': it is a multi-view video model" in message and "vividzoo_text_to_4d" in message
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, video_model=tiny_checkpoint("svd")[0]))
    assert "input 'video_model': this is SVD / SVD-XT, which MV4D Grid Conditioning conditions" in message
    conditioning, _, _ = prompt_grid(mv4d_nodes, parts, prompts, cameras)
    message = error_of(lambda: composed_guider(mv4d_nodes, parts, conditioning, multiview_model=composite))
    assert "MV4D Composed Guider: input 'multiview_model': it is a multi-view video model" in message
    message = error_of(lambda: composed_guider(mv4d_nodes, parts, conditioning, video_model=tiny_checkpoint("svd")[0]))
    assert "input 'grid_conditioning': it was built by MV4D Prompt Grid Conditioning for AnimateDiff" in message
    assert "Fix: condition these models with MV4D Grid Conditioning" in message
    wide = [[torch.zeros(1, 77, 32), {}]]
    message = error_of(lambda: prompt_grid(mv4d_nodes, parts, prompts, cameras, multiview_positive=wide))
    assert "input 'multiview_positive': the prompt is encoded 32 wide but the model reads 64-wide text" in message
