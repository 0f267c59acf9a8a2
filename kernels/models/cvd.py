"""CVD's cross-video synchronisation module (Kuang et al. 2024, "Collaborative Video Diffusion";
CollaborativeVideoDiffusion/CVD), on the pack's grid, and the key map of its checkpoint.

M videos of one scene, each along its own camera trajectory, are sampled together in one batch: a grid of V = M
views ("videos") x F frames (kernels/grid.py). After every down- and up-block motion module (not the mid block) a
module lets each video's tokens at frame t attend to its partner video's tokens at frame t, near the epipolar
lines of the two cameras only (kernels/epipolar.py):

    x + proj_out(blocks(proj_in(GroupNorm(x))))      blocks: 2 x (LayerNorm -> masked attention of the video's
                                                     tokens (queries) over its partner's (keys, values), residual)
                                                     -> LayerNorm -> GEGLU feed-forward, residual

GroupNorm per frame, 8 heads, no position table; CVD trains proj_out from zero, so an untrained module changes
nothing. Partners: two videos attend to each other; more are paired by a random perfect matching drawn for each
sampling step (CVD's advanced pipeline). For an odd count, which CVD's code refuses, one video is left over and
attends to a random other video (one way: that one keeps its own partner).

Masks: for every ordered pair of videos (a, b) and frame t, the epipolar mask of queries in video a's frame t over
keys in video b's frame t. They are built in compact form once per set of trajectories, and densely once per UNet
level (feature size) of a sampling run, within a memory budget (CrossVideoMasks); past the budget a level's masks
are built block by block inside every attention call instead (bounded memory, more compute). Pairs whose cameras
coincide (trajectories that start together, as CVD's do) get CVD's pseudo-epipolar line of random slope.

CVD.ckpt (train_epi_control.py) is {'unet_trainable_dict': ..., 'epoch', 'global_step', 'optimizer_state_dict'};
the trainable dict holds parameters only (not the pixel-grid buffer pos_encoder.coords), keyed
{down_blocks.{0-3}.epi_modules.{0,1} | up_blocks.{0-3}.epi_modules.{0,1,2}}.epi_transformer.{norm, proj_in,
transformer_blocks.0.{attention_blocks.{0,1}.{to_q, to_k, to_v, to_out.0}, norms.{0,1}, ff.net.0.proj, ff.net.2,
ff_norm}, proj_out}: 20 modules with the channels of the motion modules they follow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..cameras import CameraRig
from ..epipolar import (CVD_BAND_FRACTION, CVD_DECAY, CVD_REFERENCE_PIXELS, DEFAULT_MAX_MASK_BYTES, DenseEpipolarMask,
                        EpipolarMask, MaskMode, build_epipolar_mask, epipolar_attention, reference_size_for)
from ..errors import InvalidInput
from ..files import atomic_file
from ..grid import Grid
from .motion import HEADS, SD15_CHANNELS, GEGLUFeedForward, ModuleCall

DEFAULT_MASK_CACHE_MB = 1024  # dense masks kept for a sampling run, all levels together
DEFAULT_MASK_CACHE_BYTES = DEFAULT_MASK_CACHE_MB * 2**20


@dataclass(frozen=True)
class CVDSettings:
    """How the videos are synchronised (the defaults are CVD's inference settings; read by MV4D Apply CVD and the
    benchmark). mode soft: the released code's bias, which CVD.ckpt was trained with; hard: the paper's band of tau
    pixels. Distances at reference_resolution px on the long side (CVD: 256). seed: the matchings and the
    pseudo-epipolar slopes; matchings: random pairings averaged per step (CVD: 1 for 4 videos, 2 for 6)."""

    mode: MaskMode = "soft"
    tau: float = 3.0
    band_fraction: float = CVD_BAND_FRACTION
    decay: float = CVD_DECAY
    reference_resolution: int = CVD_REFERENCE_PIXELS
    seed: int = 0
    matchings: int = 1
    camera_scale: float = 1.0
    mask_cache_mb: int = DEFAULT_MASK_CACHE_MB


_EPI_KEY = re.compile(r"(?:^|\.)((?:down|up)_blocks\.\d+)\.epi_modules\.(\d+)\.(epi_transformer\..+)$")
_IGNORED_BUFFER = ".pos_encoder.coords"  # CVD's pixel grid: a buffer, recomputed by our mask builder


# Pairing: which video each video attends to.

def draw_partners(videos: int, generator: torch.Generator) -> torch.Tensor:
    """(videos,) long, partner[v] != v. An even count: a uniformly random perfect matching (partner[partner[v]] == v),
    as CVD's advanced pipeline draws (np.random.permutation(N).reshape(2, N // 2)). An odd count: a perfect matching
    of all but one video, which attends to a random other video."""
    if videos < 2:
        raise InvalidInput("videos", f"cross-video attention needs at least 2 videos, got {videos}", "sample 2 or more videos together")
    order = torch.randperm(videos, generator=generator)
    half = videos // 2
    partners = torch.empty(videos, dtype=torch.long)
    partners[order[:half]] = order[half:2 * half]
    partners[order[half:2 * half]] = order[:half]
    if videos % 2:
        partners[order[-1]] = order[int(torch.randint(videos - 1, (1,), generator=generator))]
    return partners


def matching_seed(seed: int, step: int, draw: int) -> int:
    """One generator seed per (seed, sampling step, draw), so a step's matchings do not depend on how ComfyUI
    splits its cond / uncond batch into calls."""
    return (int(seed) * 1_000_003 + int(step) * 1_009 + int(draw)) % (2**63 - 1)


def partners_for_step(videos: int, seed: int, step: int, draw: int = 0) -> torch.Tensor:
    return draw_partners(videos, torch.Generator().manual_seed(matching_seed(seed, step, draw)))


# Masks for every ordered video pair and frame, per UNet level.

class CrossVideoMasks:
    """The epipolar masks between the videos of one trajectory set.

    cameras: V x F cameras, video by video (camera v F + t is video v's frame t), in one world frame. Mask pair
    `table[a, b, t]` has queries in video a's frame t and keys in video b's frame t. Distances are measured at
    `reference_resolution` pixels on the long side (CVD: 256), 0 = the cameras' image size.

    `at(size, ...)` gives a level's masks: dense, built once and kept while they fit in max_dense_bytes (all
    levels together) and in half the device's free memory, else the compact masks at that size (attention then
    builds them block by block per call).
    `clear()` drops what was kept (after a sampling run).
    """

    def __init__(self, cameras: CameraRig, grid: Grid, mode: MaskMode = "soft", tau: float = 3.0,
                 band_fraction: float = CVD_BAND_FRACTION, decay: float = CVD_DECAY,
                 reference_resolution: int = CVD_REFERENCE_PIXELS, seed: int = 0,
                 max_dense_bytes: int = DEFAULT_MASK_CACHE_BYTES):
        if len(cameras) != grid.cells:
            raise InvalidInput("cameras", f"{len(cameras)} cameras for {grid.views} videos of {grid.frames} frames",
                               f"give one camera per frame of every video ({grid.cells}, video by video)")
        if grid.views < 2:
            raise InvalidInput("videos", f"cross-video masks need at least 2 videos, got {grid.views}", "sample 2 or more videos together")
        self.grid = grid
        videos, frames = grid.views, grid.frames
        self.table = torch.full((videos, videos, frames), -1, dtype=torch.long)
        pairs = []
        for source in range(videos):
            for target in range(videos):
                if source != target:
                    for frame in range(frames):
                        self.table[source, target, frame] = len(pairs)
                        pairs.append((grid.index(source, frame), grid.index(target, frame)))
        reference = None if reference_resolution == 0 else reference_size_for(cameras, reference_resolution)
        self.compact = build_epipolar_mask(cameras, (1, 1), pairs=pairs, mode=mode, tau=tau, band_fraction=band_fraction,
                                           decay=decay, reference_size=reference, seed=seed)
        self.max_dense_bytes = int(max_dense_bytes)
        self._levels: dict[tuple, EpipolarMask | DenseEpipolarMask] = {}
        self.builds = 0  # dense level builds since creation (a test counts them)

    @classmethod
    def for_settings(cls, cameras: CameraRig, grid: Grid, settings: CVDSettings) -> CrossVideoMasks:
        return cls(cameras, grid, settings.mode, settings.tau, settings.band_fraction, settings.decay,
                   settings.reference_resolution, settings.seed, settings.mask_cache_mb * 2**20)

    @property
    def mode(self) -> MaskMode:
        return self.compact.mode

    @property
    def dense_bytes(self) -> int:
        return sum(mask.nbytes for mask in self._levels.values() if isinstance(mask, DenseEpipolarMask))

    def levels(self) -> dict[tuple[int, int], EpipolarMask | DenseEpipolarMask]:
        """The masks of each level seen since the last clear, by feature size."""
        return {key[0]: mask for key, mask in self._levels.items()}

    def at(self, size: tuple[int, int], device=None, dtype: torch.dtype = torch.float32) -> EpipolarMask | DenseEpipolarMask:
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (tuple(size), device, dtype if self.mode == "soft" else torch.bool)
        if key not in self._levels:
            level = self.compact.at_size(tuple(size))
            wanted = level.dense_bytes(dtype)
            if self.dense_bytes + wanted <= self.max_dense_bytes and wanted <= free_bytes(device) // 2:
                level = level.precomputed(device, dtype)
                self.builds += 1
            self._levels[key] = level
        return self._levels[key]

    def clear(self) -> None:
        self._levels.clear()

    def pair_indices(self, partners: torch.Tensor, chunks: int) -> torch.Tensor:
        """(chunks F V,) mask pair of every attention sequence, in the order of Grid.videos_at_frame (b, f, v):
        video v at frame t attends to partners[v] at frame t."""
        videos = torch.arange(self.grid.views)
        per_video = self.table[videos, partners.cpu()]  # (V, F)
        return per_video.T.reshape(-1).repeat(chunks)


def free_bytes(device: torch.device) -> int:
    """Memory free on the device now (a budget typed too large must not run it out: a level that does not fit in
    half of it is rebuilt per call instead)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no bound beyond the budget
        return 2**62


@dataclass(frozen=True)
class CrossVideoCall:
    """What one UNet call's cross-video modules need (ModuleCall.cross_video): the pairing of this call and the
    masks. max_attention_bytes bounds the mask block each attention call holds at once."""

    partners: torch.Tensor  # (V,) long
    masks: CrossVideoMasks
    max_attention_bytes: int = DEFAULT_MAX_MASK_BYTES


def cross_video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: CrossVideoCall, grid: Grid,
                          size: tuple[int, int], heads: int = HEADS) -> torch.Tensor:
    """q, k, v (B, h w, C) of a view-major grid batch -> (B, h w, C): at every frame, each video's queries attend
    to its partner's keys and values of the same frame and cond / uncond chunk, through that pair's mask."""
    chunks = grid.chunks(q.shape[0], "tokens")
    partners = call.partners.to(q.device)
    query, key, value = (grid.videos_at_frame(t) for t in (q, k, v))  # (b, f, v, L, C)
    key, value = key[:, :, partners], value[:, :, partners]
    b, f, videos, length, channels = query.shape

    def split(t):
        return t.reshape(b * f * videos, length, heads, channels // heads).transpose(1, 2)

    mask = call.masks.at(size, q.device, q.dtype)
    out = epipolar_attention(split(query), split(key), split(value), mask, call.masks.pair_indices(call.partners, chunks),
                             call.max_attention_bytes)
    return grid.videos_apart(out.transpose(1, 2).reshape(b, f, videos, length, channels))


# The module, in CVD's key layout.

class CrossVideoAttention(nn.Module):
    """attention_blocks.i: to_q / to_k / to_v without bias, to_out.0 with bias (diffusers' Attention, as CVD's
    EpiSelfAttention is)."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.to_q = operations.Linear(channels, channels, bias=False)
        self.to_k = operations.Linear(channels, channels, bias=False)
        self.to_v = operations.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels)])

    def forward(self, x, call: CrossVideoCall, grid: Grid, size):
        return self.to_out[0](cross_video_attention(self.to_q(x), self.to_k(x), self.to_v(x), call, grid, size))


class CrossVideoBlock(nn.Module):
    def __init__(self, channels: int, operations=nn, attentions: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(CrossVideoAttention(channels, operations) for _ in range(attentions))
        self.norms = nn.ModuleList(operations.LayerNorm(channels) for _ in range(attentions))
        self.ff = GEGLUFeedForward(channels, operations)
        self.ff_norm = operations.LayerNorm(channels)

    def forward(self, x, call: CrossVideoCall, grid: Grid, size):
        for block, norm in zip(self.attention_blocks, self.norms):
            x = block(norm(x), call, grid, size) + x
        return self.ff(self.ff_norm(x)) + x


class CrossVideoTransformer(nn.Module):
    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.norm = operations.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = operations.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([CrossVideoBlock(channels, operations)])
        self.proj_out = operations.Linear(channels, channels)


class CrossVideoModule(nn.Module):
    """CVD's EpiModule (keys epi_transformer.*), run after a motion module as its `after` (MotionModule), on a
    view-major grid batch (B, C, h, w) whose views are the videos. Without a pairing for the call
    (ModuleCall.cross_video None) it passes x through."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.epi_transformer = CrossVideoTransformer(channels, operations)

    def forward(self, x: torch.Tensor, call: ModuleCall) -> torch.Tensor:
        cross_video = call.cross_video
        if cross_video is None:
            return x
        grid, transformer = call.grid, self.epi_transformer
        batch, channels, height, width = x.shape
        if grid.views != cross_video.masks.grid.views or grid.frames != cross_video.masks.grid.frames:
            raise InvalidInput("latent", f"the batch is a grid of {grid.views} videos x {grid.frames} frames, but the "
                               f"trajectories are {cross_video.masks.grid.views} x {cross_video.masks.grid.frames}",
                               "sample the latent that MV4D Apply CVD made with these trajectories")
        tokens = transformer.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # per frame
        hidden = transformer.proj_in(tokens)
        for block in transformer.transformer_blocks:
            hidden = block(hidden, cross_video, grid, (height, width))
        out = transformer.proj_out(hidden)
        return x + out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(x)


class CrossVideoBlocks(nn.Module):
    def __init__(self, channels: int, count: int, operations=nn):
        super().__init__()
        self.epi_modules = nn.ModuleList(CrossVideoModule(channels, operations) for _ in range(count))


class CVDModel(nn.Module):
    """All synchronisation modules of a CVD file, keyed as CVD.ckpt's unet_trainable_dict:
    down_blocks.{0-3}.epi_modules.{0,1}, up_blocks.{0-3}.epi_modules.{0,1,2}."""

    def __init__(self, channels=SD15_CHANNELS, operations=nn):
        super().__init__()
        self.channels = tuple(channels)
        self.down_blocks = nn.ModuleList(CrossVideoBlocks(c, 2, operations) for c in channels)
        self.up_blocks = nn.ModuleList(CrossVideoBlocks(c, 3, operations) for c in reversed(channels))

    def by_motion_module(self) -> dict[str, CrossVideoModule]:
        """{motion-module name (down_blocks.i.motion_modules.j): the module that follows it}."""
        found = {}
        for kind, blocks in (("down_blocks", self.down_blocks), ("up_blocks", self.up_blocks)):
            for index, block in enumerate(blocks):
                for slot, module in enumerate(block.epi_modules):
                    found[f"{kind}.{index}.motion_modules.{slot}"] = module
        return found

    def zero_init(self) -> CVDModel:
        """proj_out at zero, as CVD starts training: the modules then change nothing."""
        for module in self.by_motion_module().values():
            nn.init.zeros_(module.epi_transformer.proj_out.weight)
            nn.init.zeros_(module.epi_transformer.proj_out.bias)
        return self


# Checkpoints.

def normalize_cvd_state_dict(state_dict: dict, argument: str = "cvd_module") -> dict:
    """CVD.ckpt's {'unet_trainable_dict': ...} (or that dict alone, or our safetensors conversion, under any
    prefix) -> {down_blocks.i.epi_modules.j.epi_transformer.*: tensor}."""
    inner = state_dict.get("unet_trainable_dict")
    if isinstance(inner, dict):
        state_dict = inner
    if any(".mid_block.epi_modules." in f".{key}" for key in state_dict):
        raise InvalidInput(argument, "the file has a synchronisation module in the mid block, which CVD's released "
                           "configuration has not", "use CVD.ckpt (CollaborativeVideoDiffusion/CVD) or its conversion")
    normalized = {}
    for key, value in state_dict.items():
        match = _EPI_KEY.search(key) if isinstance(value, torch.Tensor) else None
        if match is None or key.endswith(_IGNORED_BUFFER):
            continue
        block, slot, rest = match.groups()
        normalized[f"{block}.epi_modules.{slot}.{rest}"] = value
    if not normalized:
        hint = (" (it looks like an AnimateDiff motion module: load it with MV4D Load Motion Module)"
                if any(".temporal_transformer." in key for key in state_dict) else "")
        raise InvalidInput(argument, f"this file holds no CVD synchronisation modules (no down_blocks.N.epi_modules.M."
                           f"epi_transformer keys){hint}", "use CVD.ckpt (CollaborativeVideoDiffusion/CVD) or its "
                           "safetensors conversion (README, Model files)")
    return normalized


def cvd_channels(normalized: dict, argument: str = "cvd_module") -> tuple[int, ...]:
    try:
        return tuple(normalized[f"down_blocks.{block}.epi_modules.0.epi_transformer.proj_in.weight"].shape[0] for block in range(4))
    except KeyError:
        raise InvalidInput(argument, "the first synchronisation module of a down block is missing (SD1.5's CVD has 4 "
                           "down blocks)", "use a complete CVD.ckpt") from None


def load_cvd_model(normalized: dict, argument: str = "cvd_module", operations=nn) -> CVDModel:
    model = CVDModel(cvd_channels(normalized, argument), operations=operations)
    expected = model.state_dict()
    missing = [key for key in expected if key not in normalized]
    if missing:
        raise InvalidInput(argument, f"the file lacks {len(missing)} of the {len(expected)} weights of CVD's modules "
                           f"(first: {missing[0]})", "use a complete CVD.ckpt")
    unexpected = [key for key in normalized if key not in expected]
    if unexpected:
        raise InvalidInput(argument, f"{unexpected[0]} is no weight of CVD's modules (a different configuration?)",
                           "use CVD.ckpt as released")
    wrong = [key for key, value in normalized.items() if tuple(value.shape) != tuple(expected[key].shape)]
    if wrong:
        raise InvalidInput(argument, f"{wrong[0]} has shape {tuple(normalized[wrong[0]].shape)}, expected "
                           f"{tuple(expected[wrong[0]].shape)}", "use CVD.ckpt as released")
    model.load_state_dict(normalized)
    return model


def convert_cvd_checkpoint(source: str | Path, destination: str | Path | None = None) -> Path:
    """CVD.ckpt -> a .safetensors of its synchronisation modules only (the same keys; no optimizer state, no
    pickle), written atomically next to it unless `destination` is given. Reads the pickle as weights only."""
    source = Path(source)
    destination = Path(destination) if destination is not None else source.with_suffix(".safetensors")
    import safetensors.torch

    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # an unreadable or non-weights pickle: say which and why, never run its code
        raise InvalidInput("source", f"{source.name} cannot be read as weights ({str(error).splitlines()[0]})",
                           "pass CVD.ckpt as downloaded") from None
    normalized = normalize_cvd_state_dict(state_dict, "source")
    with atomic_file(destination) as temporary:
        safetensors.torch.save_file({key: value.contiguous() for key, value in normalized.items()}, str(temporary),
                                    metadata={"format": "mv4d.cvd", "source": source.name})
    return destination


def main(argv=None) -> int:
    """python -m mv4d.kernels.models.cvd CVD.ckpt [CVD.safetensors]"""
    import argparse

    parser = argparse.ArgumentParser(description="Convert CVD.ckpt into a .safetensors of its synchronisation modules.")
    parser.add_argument("source", help="CVD.ckpt")
    parser.add_argument("destination", nargs="?", help="where to write (default: next to the source, .safetensors)")
    args = parser.parse_args(argv)
    try:
        written = convert_cvd_checkpoint(args.source, args.destination)
    except InvalidInput as error:
        parser.exit(2, f"{error}\n")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
