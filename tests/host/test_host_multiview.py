"""MVDream and ImageDream as native ComfyUI models, on tiny models of the real SD1.5 / SD2.1 layouts.

Properties: the loader reads the original .pt / .safetensors and the diffusers layout to the same model; one view
with the camera MLP zeroed is plain SD; the multi-view attention is attention over the views' concatenated tokens;
permuting views with their cameras permutes the outputs; ImageDream with image-prompt weight 0 and no pixel
controller is MVDream on the same weights; the pixel controller's view is a conditioning slot. Real-size layouts are
checked on meta tensors. Bad input is refused naming node, input and fix.
"""

from __future__ import annotations

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import (MULTIVIEW_KINDS, tiny_clip_vision, tiny_multiview_checkpoint, tiny_sd_model, tiny_text_encoder,
                              tiny_vae, write_diffusers_folder)

SIZE, STEPS = 64, 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def encoders(comfy):
    return {"clip": tiny_text_encoder(), "vae": tiny_vae(), "clip_vision": tiny_clip_vision()}


@pytest.fixture(scope="module")
def checkpoints(comfy):
    from mv4d.kernels.models.multiview import split_checkpoint

    return {kind: split_checkpoint(tiny_multiview_checkpoint(kind, seed=index)) for index, kind in enumerate(MULTIVIEW_KINDS)}


def built(checkpoint):
    from mv4d.integration.multiview_models import build_multiview_model

    return build_multiview_model(checkpoint).model


@pytest.fixture(scope="module")
def models(checkpoints):
    return {kind: built(checkpoint) for kind, checkpoint in checkpoints.items()}


def prompts(encoders, text="a small robot"):
    clip = encoders["clip"]
    return (clip.encode_from_tokens_scheduled(clip.tokenize(text)), clip.encode_from_tokens_scheduled(clip.tokenize("")))


def rig(views=4, elevation=15.0, start=0.0):
    from mv4d.kernels.cameras import orbit_rig

    return orbit_rig(views, elevation, 2.0, 33.8, SIZE, SIZE, start)


def sample(model, positive, negative, latent, noise, cfg=5.0):
    import comfy.sample

    with torch.inference_mode():
        return comfy.sample.sample(model, noise.clone(), STEPS, cfg, "euler", "normal", positive, negative,
                                   latent["samples"], seed=0, disable_pbar=True)


def mvdream_inputs(mv4d_nodes, model, encoders, cameras):
    positive, negative = prompts(encoders)
    return run_node(mv4d_nodes.MultiviewConditioning, model=model, positive=positive, negative=negative, cameras=cameras,
                    views=4, width=SIZE, height=SIZE).result


def noise_for(latent, seed=1):
    return torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))


def test_loader_reads_pt_safetensors_and_diffusers_layouts_to_the_same_model(comfy, tmp_path, checkpoints):
    import safetensors.torch

    from mv4d.integration.multiview_models import load_multiview_model

    for index, kind in enumerate(MULTIVIEW_KINDS):
        original = tiny_multiview_checkpoint(kind, seed=index)
        torch.save(original, tmp_path / f"{kind}.pt")
        safetensors.torch.save_file(original, tmp_path / f"{kind}.safetensors")
        write_diffusers_folder(tmp_path / f"{kind}-diffusers", kind, seed=index)
        loaded = [load_multiview_model(path) for path in (tmp_path / f"{kind}.pt", tmp_path / f"{kind}.safetensors",
                                                           tmp_path / f"{kind}-diffusers")]
        reference = loaded[0]
        assert reference.family.id == kind
        assert any("core Load VAE" in line for line in reference.missing)  # the tiny files hold no encoders
        for other in loaded[1:]:
            assert other.family == reference.family
            for ours, theirs in ((reference.model.model.diffusion_model, other.model.model.diffusion_model),
                                 (adapter_of(reference.model), adapter_of(other.model))):
                a, b = ours.state_dict(), theirs.state_dict()
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert reference.model.model.model_type.name == "EPS"  # SD2.1-based files too
        assert type(reference.model.model).__name__ == "BaseModel"  # a stock SD model


def adapter_of(model):
    from mv4d.integration.patches.multiview import ADAPTER_KEY

    return model.additional_models[ADAPTER_KEY][0].model


def test_one_view_with_the_camera_mlp_zeroed_is_plain_sd_sampling(mv4d_nodes, encoders, checkpoints):
    import copy

    from mv4d.integration.multiview_models import sd_unet

    for kind in ("mvdream-sd15", "mvdream-sd21"):
        checkpoint = copy.copy(checkpoints[kind])
        checkpoint.adapter = {key: torch.zeros_like(value) for key, value in checkpoint.adapter.items()}
        patched = built(checkpoint)
        plain = sd_unet(checkpoints[kind])  # the same UNet weights, no patches: what core would run
        positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, patched, encoders, rig(views=1))
        noise = noise_for(latent)
        ours = sample(patched, positive, negative, latent, noise)
        theirs = sample(plain, *prompts(encoders), latent, noise)
        difference = float((ours - theirs).abs().max())
        print(f"{kind}: 1 view, camera MLP zeroed vs plain SD: max |difference| {difference:.3g}")
        assert difference <= TOLERANCE * max(1.0, float(theirs.abs().max()))


def test_multiview_attention_equals_attention_over_the_concatenated_views(comfy):
    from mv4d.integration.patches.multiview import multiview_self_attention
    from mv4d.kernels.grid import GRID_OPTION, Grid

    views, chunks, tokens, heads, dim = 4, 2, 9, 2, 8
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(chunks * views, tokens, heads * dim, generator=generator) for _ in range(3))
    ours = multiview_self_attention(q, k, v, {"n_heads": heads, GRID_OPTION: Grid(views, 1)})
    reference = torch.empty_like(q)
    for chunk in range(chunks):
        items = slice(chunk * views, (chunk + 1) * views)

        def joined(t, items=items):  # the views' tokens one after the other, split into heads
            return t[items].reshape(views * tokens, heads, dim).transpose(0, 1)

        out = torch.softmax(joined(q) @ joined(k).transpose(1, 2) / dim ** 0.5, dim=-1) @ joined(v)
        reference[items] = out.transpose(0, 1).reshape(views, tokens, heads * dim)
    difference = float((ours - reference).abs().max())
    print(f"multi-view attention vs explicit concatenated-token reference: max |difference| {difference:.3g}")
    assert difference < 1e-5
    alone = multiview_self_attention(q, k, v, {"n_heads": heads})  # no grid: each image on its own
    assert float((alone - reference).abs().max()) > 1e-3


def test_permuting_views_with_their_cameras_permutes_the_outputs(mv4d_nodes, encoders, models):
    model, cameras = models["mvdream-sd21"], rig()
    order = [2, 0, 3, 1]
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, model, encoders, cameras)
    noise = noise_for(latent)
    straight = sample(model, positive, negative, latent, noise)
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, model, encoders, cameras.select(order))
    permuted = sample(model, positive, negative, latent, noise[order])
    difference = float((permuted - straight[order]).abs().max())
    print(f"views permuted with their cameras: max |difference| {difference:.3g}")
    assert difference <= TOLERANCE * max(1.0, float(straight.abs().max()))
    # and the views do talk to each other: another camera for view 0 changes the other views too
    moved = rig(elevation=40.0)
    from mv4d.kernels.cameras import CameraRig

    view_0_moved = CameraRig(torch.cat([moved.world_to_camera[:1], cameras.world_to_camera[1:]]), cameras.intrinsics, SIZE, SIZE)
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, model, encoders, view_0_moved)
    other = sample(model, positive, negative, latent, noise)
    assert float((other[1:] - straight[1:]).abs().max()) > 1e-4


def imagedream_inputs(mv4d_nodes, model, encoders, cameras, weight=1.0, pixel_controller=True, image=None):
    positive, negative = prompts(encoders)
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5)) if image is None else image
    return run_node(mv4d_nodes.ImageDreamConditioning, model=model, clip_vision=encoders["clip_vision"], vae=encoders["vae"],
                    image=image, positive=positive, negative=negative, cameras=cameras, views=4, width=SIZE, height=SIZE,
                    image_prompt_weight=weight, pixel_controller=pixel_controller).result


def test_imagedream_with_image_prompt_weight_zero_and_no_controller_is_mvdream_on_the_same_weights(mv4d_nodes, encoders, checkpoints, models):
    import copy

    from mv4d.kernels.models.multiview import MVDREAM_SD21, adapter_state_dict

    imagedream = checkpoints["imagedream"]
    as_mvdream = copy.copy(imagedream)
    as_mvdream.family = MVDREAM_SD21
    camera_only = {key: value for key, value in imagedream.unet.items()} | {
        key: value for key, value in imagedream.adapter.items() if key.startswith("camera_embed.")}
    as_mvdream.adapter, as_mvdream.adapter_shape = adapter_state_dict(camera_only)
    mvdream = built(as_mvdream)
    cameras = rig(elevation=5.0, start=-90.0)
    positive, negative, latent, _ = imagedream_inputs(mv4d_nodes, models["imagedream"], encoders, cameras, weight=0.0, pixel_controller=False)
    noise = noise_for(latent)
    ours = sample(models["imagedream"], positive, negative, latent, noise)
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, mvdream, encoders, cameras)
    reference = sample(mvdream, positive, negative, latent, noise)
    difference = float((ours - reference).abs().max())
    print(f"ImageDream, image-prompt weight 0, no pixel controller vs MVDream on its weights: max |difference| {difference:.3g}")
    assert difference <= TOLERANCE * max(1.0, float(reference.abs().max()))
    positive, negative, latent, _ = imagedream_inputs(mv4d_nodes, models["imagedream"], encoders, cameras, weight=1.0, pixel_controller=False)
    assert float((sample(models["imagedream"], positive, negative, latent, noise) - ours).abs().max()) > 1e-4  # the prompt acts


def test_pixel_controller_view_is_a_conditioning_slot_that_decode_grid_drops(mv4d_nodes, encoders, models):
    model, cameras = models["imagedream"], rig(elevation=5.0, start=-90.0)
    positive, negative, latent, out_cameras = imagedream_inputs(mv4d_nodes, model, encoders, cameras)
    assert latent["samples"].shape[0] == 5 and len(out_cameras) == 4
    noise = noise_for(latent)
    first = sample(model, positive, negative, latent, noise)
    other_noise = noise.clone()
    other_noise[4] = torch.randn(noise[4].shape, generator=torch.Generator().manual_seed(9))
    second = sample(model, positive, negative, latent, other_noise)
    # the controller's UNet input is the clean image latent whatever its noise: the 4 views cannot tell
    assert torch.allclose(first[:4], second[:4], atol=1e-5)
    other_image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(6))
    positive, negative, latent, _ = imagedream_inputs(mv4d_nodes, model, encoders, cameras, image=other_image)
    assert float((sample(model, positive, negative, latent, noise)[:4] - first[:4]).abs().max()) > 1e-4
    video = run_node(mv4d_nodes.DecodeGrid, vae=encoders["vae"], grid_latent={**latent, "samples": first}, cameras=out_cameras,
                     frames_per_decode=0, preview_fps=8.0).result[0]
    assert tuple(video.images.shape[:2]) == (4, 1)


def test_real_size_layouts_on_meta_tensors(comfy):
    """The released files' layouts (SD1.5 / SD2.1 UNets with MVDream's and ImageDream's additions, SD's VAE, CLIP-L)
    built from ComfyUI's own classes on the meta device: our split gives ComfyUI exactly its UNet and VAE keys, and
    the adapter exactly its own, at the released shapes."""
    import json
    from pathlib import Path

    import comfy.clip_model
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from mv4d.integration.patches.multiview import MultiviewAdapter
    from mv4d.kernels.models.multiview import split_checkpoint

    real = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                transformer_depth_middle=1, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
                image_size=32, use_spatial_transformer=True, legacy=False, use_checkpoint=False)
    vae_config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=vae_config, embed_dim=4).state_dict()
        clip_l = comfy.clip_model.CLIPTextModel(json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text()),
                                                torch.float32, "meta", comfy.ops.disable_weight_init).state_dict()
    clip_l.pop("text_projection.weight")  # transformers' CLIPTextModel, which SD1.5 files hold, has none
    for base, context, family in (("SD15", 768, "mvdream-sd15"), ("SD20", 1024, "mvdream-sd21"), ("SD20", 1024, "imagedream")):
        config = getattr(comfy.supported_models, base)({**real, "context_dim": context, "use_linear_in_transformer": base == "SD20"})
        unet = comfy.model_base.BaseModel(config, device="meta").diffusion_model.state_dict()
        released = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
        with torch.device("meta"):
            released.update({"model.diffusion_model.camera_embed.0.weight": torch.empty(1280, 16),
                             "model.diffusion_model.camera_embed.0.bias": torch.empty(1280),
                             "model.diffusion_model.camera_embed.2.weight": torch.empty(1280, 1280),
                             "model.diffusion_model.camera_embed.2.bias": torch.empty(1280)})
            if family == "imagedream":
                released.update(imagedream_additions(unet))
        vae_prefix = "vae_model." if family == "imagedream" else "first_stage_model."
        released.update({vae_prefix + k: v for k, v in vae.items()})
        if family == "mvdream-sd15":
            released.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l.items()})
        checkpoint = split_checkpoint(released)
        assert checkpoint.family.id == family
        detected = comfy.model_detection.detect_unet_config({f"model.diffusion_model.{k}": v for k, v in checkpoint.unet.items()},
                                                            "model.diffusion_model.")
        assert (detected["model_channels"], detected["context_dim"], detected["use_linear_in_transformer"]) == (320, context, base == "SD20")
        rebuilt = comfy.model_base.BaseModel(getattr(comfy.supported_models, base)(detected), device="meta").diffusion_model
        assert set(rebuilt.state_dict()) == set(checkpoint.unet)
        rebuilt.load_state_dict(checkpoint.unet, strict=True, assign=True)  # every shape matches
        with torch.device("meta"):
            adapter = MultiviewAdapter(checkpoint.adapter_shape)
        adapter.load_state_dict(checkpoint.adapter, strict=True, assign=True)
        assert set(checkpoint.vae) == set(vae)
        if family == "imagedream":
            resampler = checkpoint.adapter_shape.resampler
            assert (resampler.heads, resampler.dim_head, resampler.queries, resampler.embedding_dim, resampler.depth) == (12, 64, 16, 1280, 4)
            assert len(checkpoint.adapter_shape.image_prompt_blocks) == 16
        if family == "mvdream-sd15":
            assert set(checkpoint.text) == set(clip_l)


def imagedream_additions(unet: dict) -> dict:
    """ImageDream's resampler (IP-Adapter-Plus: 16 queries of 1024, 4 layers of 12 x 64 heads over ViT-H/14's 1280-wide
    hidden states) and the 16 cross-attentions' to_k_ip / to_v_ip [C, 1024], on the meta device."""
    from mv4d.kernels.models.sd_unet import block_prefix, transformer_block_keys

    added = {"image_embed.latents": (1, 16, 1024), "image_embed.proj_in.weight": (1024, 1280), "image_embed.proj_in.bias": (1024,),
             "image_embed.proj_out.weight": (1024, 1024), "image_embed.proj_out.bias": (1024,),
             "image_embed.norm_out.weight": (1024,), "image_embed.norm_out.bias": (1024,)}
    for layer in range(4):
        for name, shape in (("0.norm1.weight", (1024,)), ("0.norm1.bias", (1024,)), ("0.norm2.weight", (1024,)), ("0.norm2.bias", (1024,)),
                            ("0.to_q.weight", (768, 1024)), ("0.to_kv.weight", (1536, 1024)), ("0.to_out.weight", (1024, 768)),
                            ("1.0.weight", (1024,)), ("1.0.bias", (1024,)), ("1.1.weight", (4096, 1024)), ("1.3.weight", (1024, 4096))):
            added[f"image_embed.layers.{layer}.{name}"] = shape
    keys = list(unet)
    for block in transformer_block_keys(keys):
        prefix = block_prefix(block, keys)
        channels = unet[f"{prefix}attn2.to_k.weight"].shape[0]
        added[f"{prefix}attn2.to_k_ip.weight"] = added[f"{prefix}attn2.to_v_ip.weight"] = (channels, 1024)
    return {f"model.diffusion_model.{key}": torch.empty(shape) for key, shape in added.items()}


def test_bad_input_names_node_input_and_fix(comfy, mv4d_nodes, encoders, models, tmp_path):
    import safetensors.torch

    from mv4d.integration.node_errors import NodeInputError

    # a plain SD file given to our loader
    comfy.add_model_folder_path("checkpoints", str(tmp_path))
    plain = {f"model.diffusion_model.{k}": v for k, v in tiny_sd_model("SD15").diffusion_model.state_dict().items()}
    safetensors.torch.save_file(plain, tmp_path / "plain_sd.safetensors")
    with pytest.raises(NodeInputError, match=r"MV4D Load Multi-view Model: input 'ckpt_name': .*plain Stable Diffusion.*Fix: load plain SD"):
        run_node(mv4d_nodes.LoadMultiviewModel, ckpt_name="plain_sd.safetensors")
    # a multi-view file loaded by a core loader: the conditioning names the right loader
    from mv4d.integration.multiview_models import sd_unet
    from mv4d.kernels.models.multiview import split_checkpoint

    core_loaded = sd_unet(split_checkpoint(tiny_multiview_checkpoint("mvdream-sd15")))
    with pytest.raises(NodeInputError, match=r"MV4D Multi-view Conditioning: input 'model': .*Fix: load the file with MV4D Load Multi-view Model"):
        mvdream_inputs(mv4d_nodes, core_loaded, encoders, rig())
    # MVDream given to the ImageDream node
    with pytest.raises(NodeInputError, match=r"MV4D ImageDream Conditioning: input 'model': .*takes no image prompt"):
        imagedream_inputs(mv4d_nodes, models["mvdream-sd21"], encoders, rig())
    # a camera count that does not match the latent batch
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, models["mvdream-sd15"], encoders, rig())
    wrong = {"samples": torch.zeros(6, 4, SIZE // 8, SIZE // 8)}
    with pytest.raises(NodeInputError, match=r"MV4D Multi-view Conditioning: input 'cameras': it gives 4 camera rows but the sampled latent has 6 items"):
        sample(models["mvdream-sd15"], positive, negative, wrong, torch.zeros(6, 4, SIZE // 8, SIZE // 8))
    # a view count the model cannot take
    with pytest.raises(NodeInputError, match=r"MV4D ImageDream Conditioning: input 'cameras': 3 views.*multiple of 4"):
        imagedream_inputs(mv4d_nodes, models["imagedream"], encoders, rig(views=3))


def test_the_model_stays_a_stock_sd_model_that_core_lora_loading_patches(mv4d_nodes, encoders, models):
    import comfy.sd

    from mv4d.integration.patches.multiview import multiview_family

    model = models["mvdream-sd15"]
    channels = model.model.diffusion_model.state_dict()["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape[0]
    generator = torch.Generator().manual_seed(3)
    lora = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(channels, 4, generator=generator),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, channels, generator=generator),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert multiview_family(with_lora) == "mvdream-sd15"  # our patches survive core's clone
    positive, negative, latent, _ = mvdream_inputs(mv4d_nodes, model, encoders, rig())
    noise = noise_for(latent)
    assert float((sample(with_lora, positive, negative, latent, noise) - sample(model, positive, negative, latent, noise)).abs().max()) > 1e-4
