"""Vivid-ZOO's composite on tiny models of the real layouts: MVDream-1.5 + AnimateDiff v2 + alignment adapters.

Properties: fresh (zero) adapters are exactly the naive composition; training changes the adapters and nothing else
(every base tensor bit-identical); saved adapters reload to identical outputs; training lowers the denoising loss
on held-out clips against zero adapters; a resumed training equals an uninterrupted one; an interrupted training
leaves its last checkpoint loadable; adapters for another base are refused, another setting is warned about.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import tiny_motion_module, tiny_multiview_model

VIEWS, FRAMES, SIZE = 4, 4, 64


@pytest.fixture(scope="module")
def parts(comfy):
    from mv4d.integration.alignment_training import encode_clips, text_context
    from mv4d.integration.patches.alignment import fresh_adapters, with_alignment_adapters
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.training_data import demo_clips

    with torch.inference_mode():  # as ComfyUI loads models
        model, clip, vae, _ = tiny_multiview_model("mvdream-sd15")
        video = with_motion(model, tiny_motion_module("v2"))
        composite = with_alignment_adapters(video, fresh_adapters(video, VIEWS, FRAMES, SIZE))
        train = encode_clips(demo_clips(6, VIEWS, FRAMES, SIZE, seed=1), composite, vae, clip)
        held_out = encode_clips(demo_clips(2, VIEWS, FRAMES, SIZE, seed=99), composite, vae, clip)
        empty = text_context(clip, "").float()
    return {"base": model, "clip": clip, "vae": vae, "video": video, "train": train, "held_out": held_out, "empty": empty}


def composite_of(parts, adapters=None):
    from mv4d.integration.patches.alignment import fresh_adapters, with_alignment_adapters

    return with_alignment_adapters(parts["video"], adapters or fresh_adapters(parts["video"], VIEWS, FRAMES, SIZE))


def sample(mv4d_nodes, model, parts, seed=3):
    import comfy.sample

    clip = parts["clip"]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a ball rolling"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    positive, negative, latent, _ = run_node(mv4d_nodes.MultiviewConditioning, model=model, positive=positive, negative=negative,
                                             views=VIEWS, width=SIZE, height=SIZE, frames=FRAMES).result
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 3, 7.5, "euler", "normal", positive, negative, latent["samples"], seed=0, disable_pbar=True)


def frozen_state(parts) -> dict[str, torch.Tensor]:
    """Every base tensor: the UNet (motion modules ejected), the motion modules, MVDream's camera MLP."""
    from mv4d.integration.patches.motion import motion_of
    from mv4d.integration.patches.multiview import ADAPTER_KEY

    state = {}
    for prefix, module in (("unet.", parts["base"].model.diffusion_model), ("motion.", motion_of(parts["video"])),
                           ("camera.", parts["base"].additional_models[ADAPTER_KEY][0].model)):
        for key, value in module.state_dict().items():
            injected = prefix == "unet." and "temporal_transformer" in key  # motion modules inside the UNet while patched
            if ".align_" not in key and not injected:  # the adapters hang on the motion modules while patched
                state[prefix + key] = value.detach().clone()
    return state


def test_fresh_adapters_are_exactly_the_naive_composition(mv4d_nodes, parts):
    naive = sample(mv4d_nodes, parts["video"], parts)
    fresh = sample(mv4d_nodes, composite_of(parts), parts)
    assert torch.equal(naive, fresh)


def test_training_changes_only_the_adapters_lowers_held_out_loss_and_saved_adapters_reload(mv4d_nodes, parts, tmp_path):
    from mv4d.integration.alignment_training import held_out_loss, train_alignment_adapters
    from mv4d.integration.patches.alignment import alignment_adapters_of
    from mv4d.kernels.models.alignment import TrainingSettings, load_adapters

    composite = composite_of(parts)
    timesteps = [150, 400, 650, 900]
    zero = held_out_loss(composite, parts["held_out"], timesteps)
    before = frozen_state(parts)
    settings = TrainingSettings(steps=60, learning_rate=1e-3, checkpoint_every=20, seed=5)
    with torch.inference_mode():
        result = train_alignment_adapters(composite, parts["train"], settings, parts["empty"], tmp_path / "a.safetensors")
    trained = held_out_loss(composite, parts["held_out"], timesteps)
    print(f"held-out denoising loss: zero adapters {zero:.5f}, after 60 steps {trained:.5f} ({100 * (trained - zero) / zero:+.1f} %); "
          f"training blocks {[round(x, 4) for x in result.losses]}")
    assert trained < zero
    after = frozen_state(parts)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # the base: bit-identical
    adapters = alignment_adapters_of(composite)
    assert any(float(p.abs().max()) > 0 for p in adapters.parameters())  # the adapters: trained
    loaded, extra = load_adapters(tmp_path / "a.safetensors")
    assert loaded.info.steps_trained == 60 and any(key.startswith("optimizer.") for key in extra)
    trained_weights = adapters.state_dict()
    assert loaded.state_dict().keys() == trained_weights.keys()
    assert all(torch.equal(weight, trained_weights[key]) for key, weight in loaded.state_dict().items())  # bit for bit
    # the same weights in other memory: CPU matrix kernels may round differently by alignment (seen here: 3e-4 on
    # values up to 520), so the samples agree to float32 rounding, not bit for bit
    reloaded, expected = sample(mv4d_nodes, composite_of(parts, loaded), parts), sample(mv4d_nodes, composite, parts)
    assert torch.allclose(reloaded, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_a_resumed_training_equals_an_uninterrupted_one_and_an_interrupted_one_keeps_its_checkpoint(parts, tmp_path):
    from mv4d.integration.alignment_training import train_alignment_adapters
    from mv4d.integration.patches.alignment import alignment_adapters_of
    from mv4d.kernels.models.alignment import TrainingSettings, load_adapters

    settings = TrainingSettings(steps=12, learning_rate=1e-3, checkpoint_every=4, seed=2)
    whole = composite_of(parts)
    with torch.inference_mode():
        train_alignment_adapters(whole, parts["train"], settings, parts["empty"], tmp_path / "whole.safetensors")

    class Cancel(Exception):
        pass

    def cancel_at_step_7(step, total, loss):
        if step == 7:
            raise Cancel  # what ComfyUI's interrupt does inside the progress callback

    with pytest.raises(Cancel), torch.inference_mode():
        train_alignment_adapters(composite_of(parts), parts["train"], settings, parts["empty"], tmp_path / "cut.safetensors",
                                 on_step=cancel_at_step_7)
    checkpoint, _ = load_adapters(tmp_path / "cut.safetensors")  # loadable: written whole at step 4
    assert checkpoint.info.steps_trained == 4
    resumed = composite_of(parts)
    with torch.inference_mode():
        train_alignment_adapters(resumed, parts["train"], settings, parts["empty"], tmp_path / "cut.safetensors", resume=True)
    for a, b in zip(alignment_adapters_of(whole).parameters(), alignment_adapters_of(resumed).parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_adapters_for_another_base_are_refused_and_another_setting_warned_about(mv4d_nodes, parts, caplog):
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.integration.patches.alignment import fresh_adapters
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.models.alignment import AdapterInfo, AlignmentAdapters

    adapters = fresh_adapters(parts["video"], VIEWS, FRAMES, SIZE)
    for other in ({"spatial_model": "mvdream-sd21"}, {"motion_model": "v3"}):
        foreign = copy.deepcopy(adapters)
        foreign.info = AdapterInfo(**{**vars(adapters.info), **other})
        with pytest.raises(NodeInputError, match=r"MV4D Apply Alignment Adapters: input 'alignment_adapters': these adapters were made for"):
            run_node(mv4d_nodes.ApplyAlignmentAdapters, model=parts["video"], alignment_adapters=foreign)
    with pytest.raises(NodeInputError, match=r"MV4D Apply Alignment Adapters: input 'model': .*not both"):
        run_node(mv4d_nodes.ApplyAlignmentAdapters, model=parts["base"])
    v3 = with_motion(parts["base"], tiny_motion_module("v3"))
    with pytest.raises(NodeInputError, match=r"made for AnimateDiff v2"):
        run_node(mv4d_nodes.ApplyAlignmentAdapters, model=v3, alignment_adapters=adapters)
    composite = run_node(mv4d_nodes.ApplyAlignmentAdapters, model=parts["video"], alignment_adapters=adapters).result[0]
    clip = parts["clip"]
    with caplog.at_level(logging.WARNING):
        run_node(mv4d_nodes.MultiviewConditioning, model=composite, positive=clip.encode_from_tokens_scheduled(clip.tokenize("x")),
                 negative=clip.encode_from_tokens_scheduled(clip.tokenize("")), views=6, width=SIZE, height=SIZE, frames=FRAMES)
    assert "adapters trained for 4 views, used with 6" in caplog.text
    assert isinstance(adapters, AlignmentAdapters)


def test_training_sets_and_the_training_node_refuse_bad_input(comfy, mv4d_nodes, parts, tmp_path):
    from mv4d.integration.node_errors import NodeInputError
    from mv4d.kernels.training_data import SUFFIX

    output = comfy.get_output_directory()
    (tmp_path / "adapters").mkdir()
    comfy.add_model_folder_path("mv4d_adapters", str(tmp_path / "adapters"), is_default=True)
    common = dict(model=parts["video"], clip=parts["clip"], vae=parts["vae"], adapter_name="x", steps=2, learning_rate=1e-4,
                  batch_size=1, seed=0, checkpoint_every=1, gradient_checkpointing=False, bf16=False, caption_dropout=0.1, resume=False)
    empty = comfy.get_output_directory() + "/empty_set"
    __import__("os").makedirs(empty, exist_ok=True)
    with pytest.raises(NodeInputError, match=r"MV4D Train Alignment Adapters: input 'dataset': .*holds no \*\.mv4d_clip\.safetensors"):
        run_node(mv4d_nodes.TrainAlignmentAdapters, dataset="empty_set [output]", **common)
    broken = f"{output}/broken_set"
    __import__("os").makedirs(broken, exist_ok=True)
    with open(f"{broken}/clip_0000{SUFFIX}", "wb") as handle:
        handle.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(NodeInputError, match=r"input 'dataset': clip_0000\.mv4d_clip\.safetensors: is not"):
        run_node(mv4d_nodes.TrainAlignmentAdapters, dataset="broken_set [output]", **common)
    with pytest.raises(NodeInputError, match=r"input 'dataset': .*not a listed training set"):
        run_node(mv4d_nodes.TrainAlignmentAdapters, dataset="nowhere", **common)
    made = run_node(mv4d_nodes.MakeDemoTrainingSet, name="tiny", clips=2, views=VIEWS, frames=FRAMES, size=SIZE, seed=0).result[0]
    assert made == "mv4d/training_sets/tiny [output]"
    assert run_node(mv4d_nodes.MakeDemoTrainingSet, name="tiny", clips=2, views=VIEWS, frames=FRAMES, size=SIZE, seed=0).result[0] == made
    trained = run_node(mv4d_nodes.TrainAlignmentAdapters, dataset=made, **common).result[0]
    assert trained.info.steps_trained == 2 and (tmp_path / "adapters" / "x.safetensors").is_file()
    with pytest.raises(NodeInputError, match=r"input 'adapter_name': .*exists already.*Fix: pick another name, or set resume"):
        run_node(mv4d_nodes.TrainAlignmentAdapters, dataset=made, **common)


def test_the_command_line_trains_resumes_and_stops_cleanly(comfy, parts, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from mv4d.integration import alignment_cli
    from mv4d.kernels.models.alignment import load_adapters
    from mv4d.kernels.training_data import SUFFIX, demo_clips, write_clip
    from mv4d_tiny_models import tiny_motion_state_dict, tiny_multiview_checkpoint

    dataset = tmp_path / "set"
    dataset.mkdir()
    for index, clip in enumerate(demo_clips(2, VIEWS, FRAMES, SIZE, seed=4)):
        write_clip(dataset / f"c{index}{SUFFIX}", clip)
    safetensors.torch.save_file(tiny_multiview_checkpoint("mvdream-sd15"), tmp_path / "mvdream.safetensors")
    safetensors.torch.save_file(tiny_motion_state_dict("v2"), tmp_path / "mm_v2.safetensors")

    def tiny_components(multiview_path, motion_path):  # the real loaders; the tiny files hold no encoders
        from mv4d.integration.motion_models import load_motion_file
        from mv4d.integration.multiview_models import load_multiview_model
        from mv4d.integration.patches.motion import with_motion

        return with_motion(load_multiview_model(multiview_path).model, load_motion_file(motion_path)), parts["clip"], parts["vae"]

    output = tmp_path / "adapters.safetensors"
    args = ["--multiview-model", str(tmp_path / "mvdream.safetensors"), "--motion-module", str(tmp_path / "mm_v2.safetensors"),
            "--dataset", str(dataset), "--output", str(output), "--steps", "3", "--checkpoint-every", "1", "--no-bf16"]
    assert alignment_cli.main(args, tiny_components) == 0
    assert load_adapters(output)[0].info.steps_trained == 3
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        alignment_cli.main(args, tiny_components)
    assert alignment_cli.main([*args[:-5], "--steps", "5", "--checkpoint-every", "1", "--no-bf16", "--resume"], tiny_components) == 0
    assert load_adapters(output)[0].info.steps_trained == 5
    assert alignment_cli.main([*args[:-5], "--steps", "0", "--resume"], tiny_components) == 2  # a clear refusal, not a traceback
    assert "steps, batch_size and checkpoint_every must be at least 1" in capsys.readouterr().err


def test_training_calls_give_the_motion_and_multiview_patches_each_clips_grid_and_cameras(parts, monkeypatch):
    """The training loss calls the UNet outside a sampler: the model's wrappers must still hand the clip's grid and
    cameras to the patches (else the motion modules would take a clip's views x frames as one long video)."""
    import mv4d.integration.patches.motion as motion
    from mv4d.integration.alignment_training import held_out_loss
    from mv4d.kernels.grid import Grid

    seen, original = [], motion.call_grid

    def recorded(options, batch):
        seen.append((original(options, batch), "camera" in options.get("mv4d", {})))
        return original(options, batch)

    monkeypatch.setattr(motion, "call_grid", recorded)
    held_out_loss(composite_of(parts), parts["held_out"], [400])
    assert seen and all(grid == Grid(VIEWS, FRAMES) and cameras for grid, cameras in seen)
