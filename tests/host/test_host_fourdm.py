"""4Diffusion's 4DM and its SDS refinement on tiny models of the real layouts (ImageDream's SD2.1 UNet, a 4dm.ckpt
in its own key layout).

Properties: 4dm.ckpt's modules land where 4DM's UNet holds them and its spatial weights (shifted layout) land on the
base's unshifted ones; 4DM with its motion modules zeroed is ImageDream frame by frame, and with them it is not;
frames run up to the motion modules' position table and are refused past it; through the real tiny 4DM and VAE, the
SDS gradient at the render latents is w(t) (eps_hat - eps) and reaches the images as the encoder's chain rule
(finite differences); the refinement node returns refined Gaussians and says what it did. Bad input (a 4DM file
without its base, the wrong base, a short video, cameras that do not match the views, ...) is refused naming node,
input and fix.
"""

from __future__ import annotations

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import (FOURDM_POSITIONS, tiny_4dm_checkpoint, tiny_4dm_model, tiny_multiview_checkpoint, tiny_multiview_model,
                              tiny_sd15_checkpoint, write_4dm_files)

SIZE, FRAMES, STEPS = 64, 3, 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fourdm(comfy):
    with torch.inference_mode():  # as ComfyUI loads models
        return tiny_4dm_model()


@pytest.fixture(scope="module")
def silent_fourdm(comfy):
    with torch.inference_mode():
        return tiny_4dm_model(zero_proj_out=True)


def video(frames=FRAMES, seed=5):
    return torch.rand(frames, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def prompts(clip):
    return clip.encode_from_tokens_scheduled(clip.tokenize("a walking robot")), clip.encode_from_tokens_scheduled(clip.tokenize(""))


def condition(mv4d_nodes, parts, frames=FRAMES, clip_video=None, cameras=None, stride=1):
    model, clip, vae, clip_vision = parts
    positive, negative = prompts(clip)
    inputs = dict(model=model, clip_vision=clip_vision, vae=vae, video=video(frames) if clip_video is None else clip_video,
                  positive=positive, negative=negative, views=4, width=SIZE, height=SIZE, frames=frames, frame_stride=stride,
                  image_prompt_weight=1.0)
    if cameras is not None:
        inputs["cameras"] = cameras
    return run_node(mv4d_nodes.FourDMConditioning, **inputs).result


def sample(model, positive, negative, latent, noise):
    import comfy.sample

    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", positive, negative, latent, seed=0, disable_pbar=True)


def test_the_4dm_file_lands_where_4dms_unet_holds_it_and_its_spatial_weights_unshifted(comfy, tmp_path, caplog):
    import logging

    import comfy.model_management

    from mv4d.integration.fourdm_models import load_4dm
    from mv4d.integration.motion_models import load_motion_file
    from mv4d.integration.patches.multiview import ADAPTER_KEY
    from mv4d.kernels.models.motion import MotionModule

    base = {key[len("model.diffusion_model."):]: value for key, value in tiny_multiview_checkpoint("imagedream").items()}
    generator = torch.Generator().manual_seed(3)
    # spatial weights as the official UNet keys them: after a motion module, one index later than ImageDream's
    official = {"middle_block.3.in_layers.2.weight": "middle_block.2.in_layers.2.weight",
                "output_blocks.2.2.conv.weight": "output_blocks.2.1.conv.weight",
                "output_blocks.5.3.conv.weight": "output_blocks.5.2.conv.weight",
                "output_blocks.8.3.conv.bias": "output_blocks.8.2.conv.bias",
                "input_blocks.1.1.proj_in.weight": "input_blocks.1.1.proj_in.weight",  # before any module: unshifted
                "camera_embed.0.weight": "camera_embed.0.weight"}
    spatial = {theirs: torch.randn(base[ours].shape, generator=generator) for theirs, ours in official.items()}
    checkpoint = tiny_4dm_checkpoint(spatial=spatial)
    fourdm_path, base_path = write_4dm_files(tmp_path)
    torch.save(checkpoint, fourdm_path)
    with torch.inference_mode():
        loaded = load_4dm(fourdm_path, base_path)
    assert loaded.spatial_weights == len(spatial) and loaded.motion.version.name == "4dm"
    assert "6 UNet weights of its own" in loaded.summary() and "position table 32 frames (trained on 8)" in loaded.summary()
    model = loaded.loaded.model
    unet_state = model.model.diffusion_model.state_dict()
    for theirs, ours in official.items():
        if ours.startswith("camera_embed."):
            adapter = model.additional_models[ADAPTER_KEY][0].model
            assert torch.equal(adapter.state_dict()[ours], spatial[theirs])
        else:
            assert torch.equal(unet_state[ours], spatial[theirs]), ours
    untouched = "input_blocks.4.0.in_layers.2.weight"
    assert torch.equal(unet_state[untouched], base[untouched])
    with caplog.at_level(logging.WARNING), torch.inference_mode():  # the motion loader alone says what it leaves out
        assert load_motion_file(fourdm_path).version.name == "4dm"
    assert "also holds UNet weights besides 4DM's motion modules, which only MV4D Load 4DM uses" in caplog.text
    state = checkpoint["state_dict"]
    comfy.model_management.load_models_gpu([model])  # ComfyUI patches the model: the modules are injected
    try:
        unet = model.model.diffusion_model
        assert len(FOURDM_POSITIONS) == 21  # every module of 4DM's UNet
        for position in FOURDM_POSITIONS.values():
            kind, *numbers = position.split(".")
            container = unet.middle_block if kind == "middle_block" else getattr(unet, kind)[int(numbers[0])]
            layer = container[int(numbers[-1])]
            assert isinstance(layer, MotionModule), position
            expected = state[f"module.{position}.temporal_transformer.proj_in.weight"]
            assert torch.equal(layer.temporal_transformer.proj_in.weight, expected), position
    finally:
        comfy.model_management.unload_all_models()


def test_4dm_with_its_motion_modules_zeroed_is_imagedream_frame_by_frame(mv4d_nodes, silent_fourdm, fourdm):
    positive, negative, latent, cameras, used = condition(mv4d_nodes, silent_fourdm)
    assert latent["samples"].shape[0] == 5 * FRAMES and latent["mv4d_grid"] == {"views": 5, "frames": FRAMES, "control_view": True}
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(1))
    ours = sample(silent_fourdm[0], positive, negative, latent["samples"], noise)
    with torch.inference_mode():
        imagedream, clip, vae, clip_vision = tiny_multiview_model("imagedream")
    columns = torch.arange(5) * FRAMES  # view-major: cell (v, f) is v F + f
    worst, scale = 0.0, 0.0
    for frame in range(FRAMES):
        text_positive, text_negative = prompts(clip)
        single = run_node(mv4d_nodes.ImageDreamConditioning, model=imagedream, clip_vision=clip_vision, vae=vae,
                          image=used[frame:frame + 1], positive=text_positive, negative=text_negative, cameras=cameras, views=4,
                          width=SIZE, height=SIZE, image_prompt_weight=1.0, pixel_controller=True).result
        reference = sample(imagedream, single[0], single[1], single[2]["samples"], noise[columns + frame])
        worst = max(worst, float((ours[columns + frame] - reference).abs().max()))
        scale = max(scale, float(reference.abs().max()))
    print(f"4DM with zeroed motion modules vs ImageDream per frame: max |difference| {worst:.3g} (max |sample| {scale:.3g})")
    assert worst <= TOLERANCE * max(1.0, scale)
    positive, negative, latent, _, _ = condition(mv4d_nodes, fourdm)
    moving = sample(fourdm[0], positive, negative, latent["samples"], noise)
    assert float((moving - ours).abs().max()) > 1e-3 * scale  # the motion modules act


def test_frames_run_past_8_up_to_the_position_table_and_are_refused_beyond_it(mv4d_nodes, fourdm):
    from mv4d.integration.node_errors import NodeInputError

    positive, negative, latent, _, used = condition(mv4d_nodes, fourdm, frames=10, clip_video=video(20), stride=2)
    assert latent["samples"].shape[0] == 5 * 10 and len(used) == 10
    out = sample(fourdm[0], positive, negative, latent["samples"], torch.randn(latent["samples"].shape))
    assert torch.isfinite(out).all()
    with pytest.raises(NodeInputError, match=r"MV4D 4DM Conditioning: input 'frames': 33 frames, but 4DM's motion modules hold a "
                                             r"position table of 32\. Fix: use at most 32 frames"):
        condition(mv4d_nodes, fourdm, frames=33, clip_video=video(40))


def test_bad_input_is_refused_naming_node_input_and_fix(mv4d_nodes, fourdm, tmp_path, comfy):
    from mv4d.integration.fourdm_models import load_4dm
    from mv4d.integration.multiview_models import load_multiview_model
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.errors import InvalidInput

    fourdm_path, base_path = write_4dm_files(tmp_path)
    with pytest.raises(InvalidInput, match=r"4dm\.ckpt: motion modules .*it needs its base\. Fix: load it with MV4D Load 4DM together "
                                           r"with ImageDream's sd-v2\.1-base-4view-ipmv\.pt"):
        load_multiview_model(fourdm_path)  # a 4DM file without its base
    torch.save(tiny_multiview_checkpoint("mvdream-sd21"), tmp_path / "mvdream.pt")
    with pytest.raises(InvalidInput, match=r"base_ckpt: mvdream\.pt is MVDream \(SD2\.1-base, 4 views\), but 4DM was trained on ImageDream"):
        load_4dm(fourdm_path, tmp_path / "mvdream.pt")
    with pytest.raises(InvalidInput, match=r"base_ckpt: 4dm\.ckpt is 4DM's own motion-module file, not its base"):
        load_4dm(fourdm_path, fourdm_path)
    with pytest.raises(InvalidInput, match=r"fourdm: sd-v2\.1-base-4view-ipmv\.pt is a model checkpoint, not 4DM's motion-module file"):
        load_4dm(base_path, base_path)
    # 4DM's motion modules on another model, or with AnimateDiff's schedule
    with torch.inference_mode():
        from mv4d.integration.fourdm_models import read_4dm
        from mv4d.kernels.models.motion import load_motion_model

        file = read_4dm(fourdm_path)
        motion = load_motion_model(file.motion, file.version).eval().requires_grad_(False)
        imagedream = tiny_multiview_model("imagedream")[0]
    apply = dict(motion=motion, frames=0, cross_frame_norm=False)
    with pytest.raises(NodeInputError, match=r"MV4D Apply Motion Module: input 'model': 4DM's motion modules were trained on ImageDream"):
        run_node(mv4d_nodes.ApplyMotionModule, model=tiny_sd15_checkpoint()[0], schedule="keep the model's", **apply)
    with pytest.raises(NodeInputError, match=r"input 'schedule': 4DM keeps ImageDream's noise schedule"):
        run_node(mv4d_nodes.ApplyMotionModule, model=imagedream, schedule="AnimateDiff (sqrt_linear)", **apply)
    assert run_node(mv4d_nodes.ApplyMotionModule, model=imagedream, schedule="keep the model's", **apply).result[0] is not None
    # the conditioning: a short video, cameras the pixel controller was not trained with, not a 4DM model
    with pytest.raises(NodeInputError, match=r"MV4D 4DM Conditioning: input 'video': it has 5 frames, but 3 frames every 3 need 7\. "
                                             r"Fix: load a longer video"):
        condition(mv4d_nodes, fourdm, frames=3, clip_video=video(5), stride=3)
    with pytest.raises(NodeInputError, match=r"MV4D 4DM Conditioning: input 'cameras': 3 views: ImageDream's pixel controller"):
        condition(mv4d_nodes, fourdm, cameras=orbit_rig(3, 0.0, 2.0, 33.8, SIZE, SIZE))
    with pytest.raises(NodeInputError, match=r"MV4D 4DM Conditioning: input 'model': this MODEL is not 4DM"):
        condition(mv4d_nodes, (imagedream, *fourdm[1:]))


@pytest.fixture(scope="module")
def refinement_inputs(mv4d_nodes, fourdm):
    positive, negative, latent, cameras, used = condition(mv4d_nodes, fourdm)
    out = sample(fourdm[0], positive, negative, latent["samples"], torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(2)))
    decoded = run_node(mv4d_nodes.DecodeGrid, vae=fourdm[2], grid_latent={**latent, "samples": out}, cameras=cameras,
                       frames_per_decode=0, preview_fps=8.0).result[0]
    fit = run_node(mv4d_nodes.Fit4DGaussians, multiview_video=decoded, iterations=30, resolution=0, views_per_step=2,
                   initial_gaussians=300, max_gaussians=300, densify=False, densify_until=0.6, grow_threshold=0.0002,
                   position_degree=1, fourier_terms=0, rotation_degree=0, temporal_opacity=False, sh_degree=0,
                   loss="L1 + D-SSIM", lpips_weight=0.0, background="white", fit_seed=0).result[0]
    return {"splats_4d": fit, "model": fourdm[0], "positive": positive, "negative": negative, "vae": fourdm[2],
            "cameras": cameras, "anchor_video": used}


REFINE_SETTINGS = dict(iterations=3, guidance_scale=5.0, timestep_min=0.02, timestep_max=0.5, window_frames=2, anchor_view=0,
                       anchor_ssim_weight=100.0, anchor_lpips_weight=0.0, sds_weight=1.0, x0_rescale=0.2, background="white", seed=0)


def test_through_the_real_4dm_the_sds_gradient_is_w_t_times_eps_hat_minus_eps_and_reaches_the_images_by_the_chain_rule(refinement_inputs):
    from mv4d.integration.multiview_conditioning import prompts_of
    from mv4d.integration.score_distillation import FourDMScore
    from mv4d.kernels.score_distillation import ScoreDistillation, SDSSettings, sds_weight

    inputs = refinement_inputs
    prompts, grid = prompts_of("test", inputs["positive"], inputs["negative"])
    assert grid.views == 5 and prompts.frames == FRAMES and prompts.control.shape[0] == FRAMES
    score = FourDMScore(inputs["model"], inputs["vae"], prompts, guidance_scale=5.0)
    with torch.inference_mode(False):
        objective = ScoreDistillation(score, inputs["cameras"], inputs["splats_4d"].frame_times, SDSSettings(window_frames=2, x0_rescale=0.0),
                                      torch.ones(3), "torch")
        draw = objective.draw(torch.Generator().manual_seed(4))
        request = objective.request(draw)
        images = torch.rand(request.grid.cells, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        with score.loaded((5 * 2, 4, SIZE // 8, SIZE // 8)):
            loss, result = objective.sds_of_images(images, request, draw)
            loss.backward()
            alpha_bar = result.alpha_bar
            latents = score.encode(images)
            noisy = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * result.noise
            eps_hat, eps_conditional = score.predict_noise(noisy, draw.timestep, request)
        torch.testing.assert_close(result.guided, eps_hat, rtol=1e-5, atol=1e-6)  # the same call gives the same score
        assert float((eps_hat - eps_conditional).abs().max()) > 1e-4  # CFG acts
        latent_gradient = sds_weight(alpha_bar, len(latents)) * (eps_hat - result.noise)
        (chain,) = torch.autograd.grad(latents, images, grad_outputs=latent_gradient)
        torch.testing.assert_close(images.grad, chain, rtol=1e-4, atol=1e-4 * float(chain.abs().max()))
        torch.testing.assert_close(result.latents - result.target, latent_gradient * len(latents), rtol=1e-4, atol=1e-6)

        def surrogate(x):  # x0_hat held: the loss whose gradient SDS is, locally
            with torch.no_grad():
                return 0.5 * (score.encode(x).double() - result.target.double()).pow(2).sum() / len(latents)

        for seed in range(2):
            direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(20 + seed))
            step = 1e-2
            numeric = float((surrogate(images.detach() + step * direction) - surrogate(images.detach() - step * direction)) / (2 * step))
            analytic = float((images.grad.double() * direction.double()).sum())
            print(f"directional derivative: finite differences {numeric:.6g}, autograd {analytic:.6g}")
            assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-6


def test_the_sds_calls_give_the_motion_modules_the_rendered_grid(refinement_inputs, monkeypatch):
    """SDS calls the UNet outside a sampler: the model's wrappers must still hand the (views + 1) x window grid to
    the patches (else the motion modules would take every view's frames as one video)."""
    import mv4d.integration.patches.motion as motion
    from mv4d.integration.multiview_conditioning import prompts_of
    from mv4d.integration.score_distillation import FourDMScore
    from mv4d.kernels.grid import Grid
    from mv4d.kernels.score_distillation import ScoreDistillation, SDSSettings

    inputs = refinement_inputs
    prompts, grid = prompts_of("test", inputs["positive"], inputs["negative"])
    seen, original = [], motion.call_grid
    monkeypatch.setattr(motion, "call_grid", lambda options, batch: seen.append(original(options, batch)) or original(options, batch))
    score = FourDMScore(inputs["model"], inputs["vae"], prompts, guidance_scale=5.0)
    with torch.inference_mode(False):
        objective = ScoreDistillation(score, inputs["cameras"], inputs["splats_4d"].frame_times, SDSSettings(window_frames=2),
                                      torch.ones(3), "torch")
        draw = objective.draw(torch.Generator().manual_seed(4))
        request = objective.request(draw)
        images = torch.rand(request.grid.cells, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(6))
        with score.loaded((grid.views * 2, 4, SIZE // 8, SIZE // 8)):
            objective.sds_of_images(images, request, draw)
    assert seen and all(call == Grid(grid.views, 2) for call in seen)


def test_the_refinement_node_refines_the_gaussians_and_reports_both_terms(mv4d_nodes, refinement_inputs):
    inputs = refinement_inputs
    result = run_node(mv4d_nodes.Refine4DWithSDS, **inputs, **REFINE_SETTINGS)
    refined = result.result[0]
    start = inputs["splats_4d"]
    assert refined.gaussians.count == start.gaussians.count and torch.equal(refined.frame_times, start.frame_times)
    assert not torch.equal(refined.gaussians.params["means"], start.gaussians.params["means"])
    assert refined.cameras is start.cameras
    text = result.ui.as_dict()["text"][0]
    assert text.startswith("3 iterations in") and "SDS objective per fifth" in text and "anchor loss" in text


def test_the_refinement_node_refuses_inputs_that_do_not_belong_together(mv4d_nodes, refinement_inputs, fourdm):
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.kernels.cameras import orbit_rig

    inputs = refinement_inputs
    cases = [
        ({"cameras": orbit_rig(8, 0.0, 2.0, 33.8, SIZE, SIZE)}, r"input 'cameras': 8 cameras, but the conditioning is of 4 views\. "
                                                               r"Fix: connect the cameras output of the same MV4D 4DM Conditioning"),
        ({"anchor_video": video(5)}, r"input 'anchor_video': 5 frames, but the conditioning has 3"),
        ({"model": tiny_multiview_model("imagedream")[0]}, r"input 'model': this MODEL is not 4DM"),
        ({"positive": prompts(fourdm[1])[0]}, r"input 'positive': this conditioning carries no image prompts"),
        ({"anchor_view": 4}, r"input 'anchor_view': there is no view 4 among 4"),
    ]
    for change, message in cases:
        with pytest.raises(NodeInputError, match=r"MV4D Refine 4D with SDS: " + message):
            run_node(mv4d_nodes.Refine4DWithSDS, **{**inputs, **REFINE_SETTINGS, **change})
    with pytest.raises(NodeInputError, match=r"input 'timestep_min': the timestep range \[0.6, 0.5\]"):
        run_node(mv4d_nodes.Refine4DWithSDS, **inputs, **{**REFINE_SETTINGS, "timestep_min": 0.6})


def test_cancel_stops_the_refinement_between_iterations(mv4d_nodes, refinement_inputs, monkeypatch):
    import comfy.model_management

    from mv4d.integration import host

    calls = []

    def cancel_at_second(done, total):
        calls.append(done)
        if done == 2:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(host, "progress", lambda every=1: cancel_at_second)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(mv4d_nodes.Refine4DWithSDS, **refinement_inputs, **{**REFINE_SETTINGS, "iterations": 50})
    assert calls == [1, 2]
