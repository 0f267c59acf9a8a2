"""AnimateDiff motion modules on the pack's grid, and the key maps of their files.

A motion module (AnimateDiff's VanillaTemporalModule; Guo et al. 2023, guoyww/AnimateDiff) sits after a UNet
block and lets the frames of each video attend to each other at every token position:

    x + proj_out(blocks(proj_in(GroupNorm(x))))        blocks: 2 x (LayerNorm -> + position table -> temporal
                                                       self-attention) -> LayerNorm -> GEGLU feed-forward, residual

GroupNorm normalises each frame on its own (AnimateDiff v2 / v3 and AnimateDiff-Evolved; diffusers' port takes the
statistics over all frames, which differs by about 2 % at real size), or, for v1, over all frames of a video.
On a V x F grid (kernels/grid.py) the frames of each view attend to each other and views never mix here.

Places for what other systems insert, all absent (or zero) by default, so that a module without them is exactly
AnimateDiff's:
- Vivid-ZOO's alignment layers: `align_in` beside proj_in and `align_out` beside proj_out (zero-init Linear(C, C));
- CameraCtrl's `qkv_merge` in the first attention: x' = qkv_merge(x + pose) * scale + x after the position table;
- a cross-video module after the module (CVD), `after`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInput
from ..grid import Grid

HEADS = 8  # every released motion module
SD15_CHANNELS = (320, 640, 1280, 1280)  # down blocks 0..3 (up blocks in reverse)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]  # (q, k, v, heads) -> out, (B, L, C)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain PyTorch attention with the (B, L, heads * d) calling convention of ComfyUI's optimized_attention."""
    batch, length, channels = q.shape
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, channels)


def position_table(length: int, channels: int) -> torch.Tensor:
    """AnimateDiff's sinusoidal table (1, length, channels): sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    table = torch.zeros(1, length, channels)
    table[0, :, 0::2] = torch.sin(position * frequency)
    table[0, :, 1::2] = torch.cos(position * frequency)
    return table


class TemporalAttention(nn.Module):
    """One temporal self-attention (attention_blocks.i): to_q / to_k / to_v without bias, to_out.0 with bias, and the
    position table (pos_encoder.pe, as the released files store it)."""

    def __init__(self, channels: int, table_length: int, operations=nn):
        super().__init__()
        self.to_q = operations.Linear(channels, channels, bias=False)
        self.to_k = operations.Linear(channels, channels, bias=False)
        self.to_v = operations.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels)])
        self.pos_encoder = nn.Module()
        self.pos_encoder.register_buffer("pe", position_table(table_length, channels))
        self.qkv_merge = None  # CameraCtrl: Linear(C, C), zero-initialised

    def forward(self, x: torch.Tensor, attention: Attention, pose: torch.Tensor | None = None, pose_scale: float = 1.0):
        """x: (sequences, frames, C)."""
        x = x + self.pos_encoder.pe[:, :x.shape[1]].to(x)
        if self.qkv_merge is not None and pose is not None:
            x = self.qkv_merge(x + pose.to(x)) * pose_scale + x
        return self.to_out[0](attention(self.to_q(x), self.to_k(x), self.to_v(x), HEADS))


class GEGLUFeedForward(nn.Module):
    """ff.net.0.proj Linear(C, 8C) -> value * gelu(gate) -> ff.net.2 Linear(4C, C) (diffusers' GEGLU layout)."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), operations.Linear(4 * channels, channels)])
        self.net[0].proj = operations.Linear(channels, 8 * channels)

    def forward(self, x):
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


class TemporalTransformerBlock(nn.Module):
    """`attentions` temporal self-attentions (AnimateDiff: 2; CameraCtrl's pose encoder: 1), then the feed-forward."""

    def __init__(self, channels: int, table_length: int, operations=nn, attentions: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(channels, table_length, operations) for _ in range(attentions))
        self.norms = nn.ModuleList(operations.LayerNorm(channels) for _ in range(attentions))
        self.ff = GEGLUFeedForward(channels, operations)
        self.ff_norm = operations.LayerNorm(channels)

    def forward(self, x, attention: Attention, pose=None, pose_scale: float = 1.0):
        for index, (block, norm) in enumerate(zip(self.attention_blocks, self.norms)):
            x = block(norm(x), attention, pose if index == 0 else None, pose_scale) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, table_length: int, operations=nn):
        super().__init__()
        self.norm = operations.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = operations.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, table_length, operations)])
        self.proj_out = operations.Linear(channels, channels)
        self.align_in = None  # Vivid-ZOO: Linear(C, C) beside proj_in (3D -> 2D features), zero-initialised
        self.align_out = None  # Vivid-ZOO: Linear(C, C) beside proj_out (2D -> 3D features), zero-initialised


@dataclass(frozen=True)
class ModuleCall:
    """What one motion-module call needs besides its input: the grid of the batch, the attention function,
    CameraCtrl's pose features at this module's resolution ((B, C, h, w), or None), and what the cross-video module
    after it needs for this call (CVD: a kernels.models.cvd.CrossVideoCall, the pairing and the masks)."""

    grid: Grid
    attention: Attention = sdpa_attention
    pose: torch.Tensor | None = None
    pose_scale: float = 1.0
    cross_frame_norm: bool = False  # AnimateDiff v1: GroupNorm statistics over all frames of a video
    cross_video: object | None = None


def _in_own_dtype(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An alignment layer applied in its own dtype (trained adapters stay float32 beside a bf16 / fp16 UNet, which
    the model's ComfyUI layers cast for themselves and these plain ones do not), the result in x's."""
    return layer(x.to(layer.weight.dtype)).to(x.dtype)


class MotionModule(nn.Module):
    """AnimateDiff's VanillaTemporalModule (keys temporal_transformer.*), on a view-major grid batch (B, C, h, w)."""

    def __init__(self, channels: int, table_length: int = 32, operations=nn):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, table_length, operations)
        self.after = None  # a cross-video module (CVD) run on this module's output: after(x, call) -> x
        self.pose_level = None  # which CameraCtrl pose-encoder level this module takes (set by MotionModel)

    @property
    def table_length(self) -> int:
        return self.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe.shape[1]

    def forward(self, x: torch.Tensor, call: ModuleCall) -> torch.Tensor:
        grid, transformer = call.grid, self.temporal_transformer
        batch, channels, height, width = x.shape
        chunks = grid.chunks(batch, "motion module input")
        if grid.frames > self.table_length:
            raise InvalidInput("frames", f"{grid.frames} frames per video, but this motion module's position table has "
                               f"{self.table_length}", f"sample at most {self.table_length} frames, or use core context windows "
                               f"(context length <= {self.table_length})")
        if call.cross_frame_norm:  # v1: one set of statistics per video (its frames together)
            videos = x.reshape(chunks * grid.views, grid.frames, channels, height, width).transpose(1, 2)
            normed = transformer.norm(videos).transpose(1, 2).reshape(batch, channels, height, width)
        else:
            normed = transformer.norm(x)
        tokens = normed.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        hidden = transformer.proj_in(tokens)
        if transformer.align_in is not None:
            hidden = hidden + _in_own_dtype(transformer.align_in, tokens)
        sequences = grid.frames_together(hidden)  # (b V h w, F, C)
        pose = None
        if call.pose is not None:
            pose = grid.frames_together(call.pose.permute(0, 2, 3, 1).reshape(batch, height * width, channels))
        for block in transformer.transformer_blocks:
            sequences = block(sequences, call.attention, pose, call.pose_scale)
        hidden = grid.frames_apart(sequences, height * width)
        out = transformer.proj_out(hidden)
        if transformer.align_out is not None:
            out = out + _in_own_dtype(transformer.align_out, hidden)
        x = x + out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(x)
        return x if self.after is None else self.after(x, call)


class MotionBlock(nn.Module):
    def __init__(self, channels: int, count: int, table_length: int, operations=nn):
        super().__init__()
        self.motion_modules = nn.ModuleList(MotionModule(channels, table_length, operations) for _ in range(count))


# Where each module goes in ComfyUI's SD UNet: ("input", i) / ("middle", 0) / ("output", i), AnimateDiff's positions
# (after a block's last transformer, else after its first ResBlock: before any Upsample).
Placement = tuple[str, int]


class MotionModel(nn.Module):
    """All motion modules of an SD1.5 AnimateDiff file, keyed as the original files are:
    down_blocks.{0-3}.motion_modules.{0,1}, up_blocks.{0-3}.motion_modules.{0,1,2}, mid_block.motion_modules.0."""

    def __init__(self, version: MotionVersion, channels=SD15_CHANNELS, operations=nn):
        super().__init__()
        self.version = version
        length = version.table_length
        self.down_blocks = nn.ModuleList(MotionBlock(c, 2, length, operations) for c in channels)
        self.up_blocks = nn.ModuleList(MotionBlock(c, 3, length, operations) for c in reversed(channels))
        self.mid_block = MotionBlock(channels[-1], 1, length, operations) if version.mid_block else None
        for _, name, module in self.placements():  # CameraCtrl: down block i takes level i, up block i level 3 - i
            kind, index = name.split(".")[:2]
            module.pose_level = int(index) if kind == "down_blocks" else 3 - int(index) if kind == "up_blocks" else None

    def placements(self) -> list[tuple[Placement, str, MotionModule]]:
        """(UNet position, state-dict name, module) of every module, in forward order."""
        found = []
        for index, block in enumerate(self.down_blocks):
            for slot, module in enumerate(block.motion_modules):
                found.append((("input", 1 + 3 * index + slot), f"down_blocks.{index}.motion_modules.{slot}", module))
        if self.mid_block is not None:
            found.append((("middle", 0), "mid_block.motion_modules.0", self.mid_block.motion_modules[0]))
        for index, block in enumerate(self.up_blocks):
            for slot, module in enumerate(block.motion_modules):
                found.append((("output", 3 * index + slot), f"up_blocks.{index}.motion_modules.{slot}", module))
        return found

    def modules_named(self) -> dict[str, MotionModule]:
        return {name: module for _, name, module in self.placements()}


@dataclass(frozen=True)
class MotionVersion:
    name: str  # "v1", "v2", "v3" (AnimateDiff) or "4dm"
    table_length: int  # frames the position table holds
    mid_block: bool
    cross_frame_norm: bool  # v1's GroupNorm statistics over all frames (of the motion modules and of the UNet)
    source_layout: str  # "original", "diffusers" or "4dm": how the file was keyed


# 4DM (aejion/4Diffusion) appends the same modules to ImageDream's UNet blocks, keyed by UNet position.
_4DM_KEY = re.compile(r"^(?:.*?\.)?(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.temporal_transformer\.(.*)$")
_DIFFUSERS_RENAMES = ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                      (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."))
_MOTION_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)$")
_MOTION_BLOCK_ANYWHERE = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)$")


def _from_4dm(state_dict: dict) -> dict:
    """4DM's keys (input_blocks.{1,2,4,5,7,8}.2, input_blocks.{10,11}.1, middle_block.2, output_blocks.{0-2}.1,
    output_blocks.{3-11}.2 .temporal_transformer.*, possibly under module. / model.diffusion_model.) -> AnimateDiff's."""
    out = {}
    for key, value in state_dict.items():
        match = _4DM_KEY.match(key)
        if match is None:
            continue
        kind, number, rest = match.group(1), match.group(2), match.group(4)
        if kind == "middle_block":
            name = "mid_block.motion_modules.0"
        elif kind == "input_blocks":
            index = int(number)
            block, slot = divmod(index - 1, 3)
            name = f"down_blocks.{block}.motion_modules.{slot}"
        else:
            block, slot = divmod(int(number), 3)
            name = f"up_blocks.{block}.motion_modules.{slot}"
        out[f"{name}.temporal_transformer.{rest}"] = value
    return out


def _from_diffusers(state_dict: dict) -> dict:
    """diffusers' MotionAdapter keys (no temporal_transformer level, attn1 / norm1 names, no position table) ->
    AnimateDiff's."""
    out = {}
    for key, value in state_dict.items():
        match = _MOTION_BLOCK.match(key)
        if match is None:
            continue
        block, slot, rest = match.groups()
        rest = f".{rest}"
        for theirs, ours in _DIFFUSERS_RENAMES:
            rest = rest.replace(theirs, ours)
        if not rest.endswith(".pos_embed.pe"):  # one table per block there, one per attention here: the same sinusoids
            out[f"{block}.motion_modules.{slot}.temporal_transformer{rest}"] = value
    return out


def normalize_motion_state_dict(state_dict: dict, table_length: int | None = None,
                                argument: str = "motion_module") -> tuple[dict, MotionVersion]:
    """Any released SD1.5 motion-module layout -> (AnimateDiff original keys, version). The version is read from
    the keys: a mid block means v2; a 24-long position table v1; a 32-long one without mid block v3 (diffusers
    files carry no table: `table_length` from their config, else 32). 4DM's layout is recognised by its UNet
    positions."""
    keys = list(state_dict)
    if any(_4DM_KEY.match(key) for key in keys) and not any(key.startswith(("down_blocks.", "up_blocks.")) for key in keys):
        layout, normalized = "4dm", _from_4dm(state_dict)
    elif any(".temporal_transformer." in key for key in keys):  # AnimateDiff's own keys, under any prefix
        layout = "original"
        normalized = {match.group(0): value for key, value in state_dict.items()
                      if (match := _MOTION_BLOCK_ANYWHERE.search(key)) is not None and ".temporal_transformer." in key}
    elif any(_MOTION_BLOCK.match(key) and ".transformer_blocks." in key for key in keys):
        layout, normalized = "diffusers", _from_diffusers(state_dict)
    else:
        raise InvalidInput(argument, "this file holds no AnimateDiff motion modules (no down_blocks.N.motion_modules.M "
                           "or temporal_transformer keys)",
                           "pick an AnimateDiff motion module (mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt), a "
                           "diffusers MotionAdapter or 4DM's 4dm.ckpt")
    # CameraCtrl's qkv_merge and CVD's modules are other files' business
    normalized = {key: value for key, value in normalized.items() if ".qkv_merge." not in key and ".processor." not in key}
    down = {int(key.split(".")[1]) for key in normalized if key.startswith("down_blocks.")}
    if down != {0, 1, 2, 3}:
        raise InvalidInput(argument, f"the file has motion modules for down blocks {sorted(down)}; SD1.5 AnimateDiff has 4 "
                           "(an SDXL motion module has 3)", "use an SD1.5 motion module with an SD1.5-based model")
    mid = any(key.startswith("mid_block.") for key in normalized)
    tables = [value for key, value in state_dict.items() if key.endswith(("pos_encoder.pe", "pos_embed.pe"))]  # diffusers: pos_embed
    length = tables[0].shape[1] if tables else (table_length or 32)
    name = "4dm" if layout == "4dm" else "v2" if mid else "v1" if length == 24 else "v3"
    version = MotionVersion(name, length, mid, cross_frame_norm=name == "v1", source_layout=layout)
    return normalized, version


def motion_channels(normalized: dict) -> tuple[int, ...]:
    """The channels of down blocks 0..3, read off their first module's proj_in."""
    return tuple(normalized[f"down_blocks.{block}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[0] for block in range(4))


def load_motion_model(normalized: dict, version: MotionVersion, argument: str = "motion_module", operations=nn) -> MotionModel:
    """A MotionModel with the file's weights (position tables taken from the file when it has them, else computed;
    they are the same sinusoids)."""
    try:
        channels = motion_channels(normalized)
    except KeyError:
        raise InvalidInput(argument, "the first motion module of a down block is missing", "use a complete motion-module file") from None
    model = MotionModel(version, channels, operations=operations)
    expected = model.state_dict()
    missing = [key for key in expected if key not in normalized and not key.endswith("pos_encoder.pe")]
    if missing:
        raise InvalidInput(argument, f"the motion module lacks {len(missing)} weights (first: {missing[0]})",
                           "use a complete motion-module file")
    wrong = [key for key, value in normalized.items() if key in expected and tuple(value.shape) != tuple(expected[key].shape)]
    if wrong:
        raise InvalidInput(argument, f"{wrong[0]} has shape {tuple(normalized[wrong[0]].shape)}, SD1.5's is "
                           f"{tuple(expected[wrong[0]].shape)}", "use an SD1.5 motion module")
    model.load_state_dict({key: value for key, value in normalized.items() if key in expected}, strict=False)
    return model
