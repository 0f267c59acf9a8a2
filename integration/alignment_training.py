"""Training Vivid-ZOO's alignment adapters: the one training function, shared by MV4D Train Alignment Adapters and
the command line (integration/alignment_cli.py).

The composite is the MODEL itself (a multi-view model with motion modules and alignment adapters, as ComfyUI
samples it), so the loss is taken through exactly the computation sampling uses: ComfyUI's apply_model with our
patches and the model's own noise schedule. Only the alignment layers train (AdamW); everything else stays frozen
and unchanged. The loss is the usual eps-prediction loss at a uniformly drawn timestep of the model's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import comfy.model_management as model_management
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ..kernels.cameras import mvdream_cameras
from ..kernels.errors import InvalidInput
from ..kernels.grid import Grid
from ..kernels.models.alignment import AlignmentAdapters, TrainingSettings, load_adapters, save_adapters
from ..kernels.training_data import Clip
from .host import normal_tensors, sampling_options
from .patches.alignment import alignment_adapters_of
from .patches.motion import motion_of
from .patches.multiview import ADAPTER_KEY as MULTIVIEW_ADAPTER_KEY


@dataclass
class EncodedClip:
    latents: torch.Tensor  # (V F, 4, h, w) in the model's latent space, view-major
    cameras: torch.Tensor  # (V F, 16) MVDream camera per cell
    context: torch.Tensor  # (1, tokens, width) the caption's text embedding
    grid: Grid


@dataclass
class TrainingResult:
    adapters: AlignmentAdapters
    losses: list[float] = field(default_factory=list)  # mean loss per block of logged steps
    steps: int = 0


def text_context(clip, text: str) -> torch.Tensor:
    return clip.encode_from_tokens(clip.tokenize(text))


def encode_clips(clips: list[Clip], model, vae, text_encoder, on_clip: Callable[[int, int], None] | None = None) -> list[EncodedClip]:
    """Latents (VAE, in the model's latent space), MVDream cameras and caption embeddings of every clip, once."""
    encoded = []
    for index, clip in enumerate(clips):
        video = clip.video
        grid = Grid(video.num_views, video.num_frames)
        latents = model.model.process_latent_in(vae.encode(grid.as_batch(video.images))).float()
        cameras = grid.per_view(mvdream_cameras(video.cameras))
        encoded.append(EncodedClip(latents.cpu(), cameras, text_context(text_encoder, clip.caption).float().cpu(), grid))
        if on_clip is not None:
            on_clip(index + 1, len(clips))
    return encoded


class _Recompute:
    """Gradient checkpointing of the UNet's ResBlocks, transformers and motion modules for the training's life:
    each forward recomputed in the backward pass instead of kept (per instance, restored afterwards)."""

    def __init__(self, unet, motion_class: type | None):
        kinds = (ResBlock, SpatialTransformer) + ((motion_class,) if motion_class else ())
        self.layers = [layer for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks] for layer in block
                       if isinstance(layer, kinds)]

    def __enter__(self):
        for layer in self.layers:
            forward = layer.forward
            layer.forward = lambda *args, _forward=forward, **kwargs: torch.utils.checkpoint.checkpoint(
                _forward, *args, use_reentrant=False, **kwargs)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


def denoising_loss(model, batch: list[EncodedClip], timesteps: torch.Tensor, noise: torch.Tensor, contexts: list[torch.Tensor],
                   device, dtype_context) -> torch.Tensor:
    """The eps-prediction loss of the composite on a batch of clips (one timestep index each, noise given)."""
    grid = batch[0].grid
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas.to(device)[timesteps].repeat_interleave(grid.cells)
    x0 = torch.cat([clip.latents for clip in batch]).to(device)
    noise = noise.to(device)
    x = x0 + noise * sigma.view(-1, 1, 1, 1)  # ComfyUI's eps noise scaling: the latent plus sigma times the noise
    context = torch.cat([c.to(device).expand(grid.cells, -1, -1) for c in contexts])
    options = sampling_options(model)["transformer_options"]
    options["cond_or_uncond"] = [0] * len(batch)
    with torch.autocast(device.type, dtype=dtype_context, enabled=dtype_context is not None):
        denoised = model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options,
                                           mv4d_camera=torch.cat([clip.cameras for clip in batch]).to(device), mv4d_grid=grid)
    predicted = (x - denoised.float()) / sigma.view(-1, 1, 1, 1)
    return F.mse_loss(predicted.float(), noise.float())


def _draw(encoded, settings: TrainingSettings, step: int, empty: torch.Tensor):
    """Step `step`'s clips, timesteps, noise and dropped captions: drawn from a generator of its own, so a resumed
    training draws exactly what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    picks = torch.randint(len(encoded), (settings.batch_size,), generator=generator).tolist()
    batch = [encoded[index] for index in picks]
    timesteps = torch.randint(1000, (len(batch),), generator=generator)
    noise = torch.randn(torch.cat([clip.latents for clip in batch]).shape, generator=generator)
    dropped = torch.rand(len(batch), generator=generator) < settings.caption_dropout
    contexts = [empty if drop else clip.context for clip, drop in zip(batch, dropped.tolist())]
    return batch, timesteps, noise, contexts


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as flat tensors (for the adapter file, so a training can resume)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
    return out


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    if state:
        saved = optimizer.state_dict()
        saved["state"] = state
        optimizer.load_state_dict(saved)


def train_alignment_adapters(model, encoded: list[EncodedClip], settings: TrainingSettings, empty_context: torch.Tensor,
                             checkpoint: Path | None = None, resume: bool = False,
                             on_step: Callable[[int, int, float], None] | None = None) -> TrainingResult:
    """Trains the alignment adapters of `model` (a multi-view model + motion modules + adapters, as
    patches/alignment.with_alignment_adapters makes it) on encoded clips, in place. Every `checkpoint_every` steps
    and at the end the adapters (with the optimizer state) are written whole to `checkpoint`; resume: continue
    from that file's weights, optimizer and step count. on_step(step, total, loss) may raise to stop (ComfyUI's
    Cancel): the last checkpoint written stays complete."""
    settings.check()
    adapters = alignment_adapters_of(model)
    motion = motion_of(model)
    if adapters is None or motion is None:
        raise InvalidInput("model", "training needs a multi-view model with motion modules and alignment adapters",
                           "connect MV4D Apply Alignment Adapters' model (fresh adapters: MV4D Load Alignment Adapters 'new')")
    if not encoded:
        raise InvalidInput("dataset", "the training set is empty", "give at least one clip")
    with torch.inference_mode(False), torch.enable_grad():
        model_management.load_models_gpu([model])
        device = model.load_device
        for module in (model.model, motion, adapters, *[p.model for p in model.additional_models.get(MULTIVIEW_ADAPTER_KEY, [])]):
            normal_tensors(module)
        start = 0
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        if resume and checkpoint is not None and checkpoint.is_file():
            saved, extra = load_adapters(checkpoint)
            with torch.no_grad():
                for ours, theirs in zip(adapters.parameters(), saved.parameters()):
                    ours.copy_(theirs.to(ours))
            _restore_optimizer(optimizer, extra)
            start = saved.info.steps_trained
        adapters.requires_grad_(True).train()
        autocast = torch.bfloat16 if settings.bf16 and device.type == "cuda" else None
        result = TrainingResult(adapters, steps=start)
        unet = model.model.diffusion_model
        recompute = _Recompute(unet, type(motion.placements()[0][2])) if settings.gradient_checkpointing else None
        block_loss, block = 0.0, 0
        try:
            if recompute:
                recompute.__enter__()
            for step in range(start, settings.steps):
                batch, timesteps, noise, contexts = _draw(encoded, settings, step, empty_context)
                loss = denoising_loss(model, batch, timesteps, noise, contexts, device, autocast)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                block_loss, block = block_loss + value, block + 1
                result.steps = step + 1
                if block == min(settings.checkpoint_every, 50) or step + 1 == settings.steps:
                    result.losses.append(block_loss / block)
                    block_loss, block = 0.0, 0
                adapters.with_info(steps_trained=step + 1, learning_rate=settings.learning_rate)
                if checkpoint is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                    save_adapters(checkpoint, adapters, optimizer_tensors(optimizer))
                if on_step is not None:
                    on_step(step + 1, settings.steps, value)
        finally:
            if recompute:
                recompute.__exit__(None, None, None)
            adapters.requires_grad_(False).eval()
    return result


def held_out_loss(model, encoded: list[EncodedClip], timesteps: list[int], seed: int = 0) -> float:
    """The mean denoising loss of the composite on clips at fixed timesteps and noise (no training)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.inference_mode():
        model_management.load_models_gpu([model])
        for clip in encoded:
            for timestep in timesteps:
                noise = torch.randn(clip.latents.shape, generator=generator)
                total += float(denoising_loss(model, [clip], torch.tensor([timestep]), noise, [clip.context], model.load_device, None))
    return total / (len(encoded) * len(timesteps))
