"""CameraCtrl (He et al. 2024; hehao13/CameraCtrl): camera trajectories into AnimateDiff's motion modules.

Per frame, Plücker rays (o x d, d) of the camera relative to the trajectory's first camera, at image resolution,
go through a pose encoder: PixelUnshuffle(8) -> conv_in -> 4 levels of [ResnetBlock, temporal attention] x 2 with
channels (320, 640, 1280, 1280), each level at latent / 2^i. Level i's features enter the first temporal attention
of the motion modules at that resolution through a zero-initialised qkv_merge (kernels/models/motion.py): down
block i takes level i, up block i level 3 - i, the mid block none.

Checkpoints: the original two-dict .ckpt {'pose_encoder_state_dict', 'attention_processor_state_dict'} (keys
'...motion_modules.M.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.qkv_merge.*'), or
AnimateDiff-Evolved's merged CameraCtrl_pruned.safetensors holding both sets of keys in one dict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..cameras import CameraRig
from ..errors import InvalidInput
from ..grid import Grid
from .motion import Attention, TemporalTransformerBlock, sdpa_attention

UNSHUFFLE = 8  # image pixels per latent cell: the encoder's level 0 is at latent resolution
RAY_CHANNELS = 6
_QKV_MERGE = re.compile(r"((?:down|up)_blocks\.\d+\.motion_modules\.\d+)\.temporal_transformer\.transformer_blocks\.0\."
                        r"attention_blocks\.0\.(?:processor\.)?qkv_merge\.(weight|bias)$")
QKV_MERGE_PATH = "temporal_transformer.transformer_blocks.0.attention_blocks.0.qkv_merge"  # relative to a MotionModule


class PoseResnetBlock(nn.Module):
    """CameraCtrl's adapter ResnetBlock with its released settings (ksize 1, skip connection, average-pool down)."""

    def __init__(self, in_channels: int, out_channels: int, down: bool, operations=nn):
        super().__init__()
        self.down = nn.AvgPool2d(2) if down else None
        self.in_conv = operations.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.block1 = operations.Conv2d(out_channels, out_channels, 3, padding=1)
        self.block2 = operations.Conv2d(out_channels, out_channels, 1)

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.block2(torch.relu(self.block1(x))) + x


class CameraPoseEncoder(nn.Module):
    def __init__(self, channels=(320, 640, 1280, 1280), blocks_per_level: int = 2, table_length: int = 16, operations=nn):
        super().__init__()
        self.channels = tuple(channels)
        self.unshuffle = nn.PixelUnshuffle(UNSHUFFLE)
        self.encoder_conv_in = operations.Conv2d(RAY_CHANNELS * UNSHUFFLE ** 2, channels[0], 3, padding=1)
        self.encoder_down_conv_blocks = nn.ModuleList()
        self.encoder_down_attention_blocks = nn.ModuleList()
        for level, width in enumerate(channels):
            previous = channels[max(0, level - 1)]
            self.encoder_down_conv_blocks.append(nn.ModuleList(
                PoseResnetBlock(previous if block == 0 else width, width, down=block == 0 and level > 0, operations=operations)
                for block in range(blocks_per_level)))
            self.encoder_down_attention_blocks.append(nn.ModuleList(
                TemporalTransformerBlock(width, table_length, operations, attentions=1) for _ in range(blocks_per_level)))

    @property
    def table_length(self) -> int:
        return self.encoder_down_attention_blocks[0][0].attention_blocks[0].pos_encoder.pe.shape[1]

    def forward(self, rays: torch.Tensor, grid: Grid, attention: Attention = sdpa_attention) -> list[torch.Tensor]:
        """rays (B, 6, H, W), one Plücker map per item of the view-major grid batch -> features per level
        (B, C_i, H / 8 / 2^i, W / 8 / 2^i). The temporal attention runs over the frames of each video."""
        if grid.frames > self.table_length:
            raise InvalidInput("cameras", f"{grid.frames} frames per video, but the pose encoder's position table has "
                               f"{self.table_length}", f"use at most {self.table_length} frames with CameraCtrl")
        x = self.encoder_conv_in(self.unshuffle(rays))
        features = []
        for convs, attentions in zip(self.encoder_down_conv_blocks, self.encoder_down_attention_blocks):
            for conv, block in zip(convs, attentions):
                x = conv(x)
                batch, channels, height, width = x.shape
                tokens = grid.frames_together(x.permute(0, 2, 3, 1).reshape(batch, height * width, channels))
                tokens = grid.frames_apart(block(tokens, attention), height * width)
                x = tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
            features.append(x)
        return features


def trajectory_rays(cameras: CameraRig, grid: Grid, height: int, width: int) -> torch.Tensor:
    """(V F, 6, height, width) Plücker maps of a view-major grid: video v's frames use cameras v F .. v F + F - 1
    (or the same F cameras for every video), each relative to its video's first camera, as CameraCtrl trains."""
    if len(cameras) not in (grid.frames, grid.cells):
        raise InvalidInput("cameras", f"{len(cameras)} cameras for {grid.views} video(s) of {grid.frames} frames",
                           f"give one camera per frame ({grid.frames}), or one per frame of every video ({grid.cells}, video by video)")
    rays = []
    for video in range(grid.views):
        first = video * grid.frames if len(cameras) == grid.cells else 0
        trajectory = cameras.select(range(first, first + grid.frames)).relative_to_camera(0)
        rays.append(trajectory.plucker_rays(height, width))
    return torch.cat(rays)


@dataclass
class CameraCtrlCheckpoint:
    encoder: dict  # CameraPoseEncoder keys
    qkv_merge: dict[str, dict[str, torch.Tensor]]  # motion module name -> {"weight", "bias"}

    @property
    def channels(self) -> tuple[int, ...]:
        levels = sorted({int(key.split(".")[1]) for key in self.encoder if key.startswith("encoder_down_conv_blocks.")})
        return tuple(self.encoder[f"encoder_down_conv_blocks.{level}.0.block1.weight"].shape[0] for level in levels)

    @property
    def table_length(self) -> int:
        return self.encoder["encoder_down_attention_blocks.0.0.attention_blocks.0.pos_encoder.pe"].shape[1]


def split_cameractrl(state_dict: dict, argument: str = "cameractrl") -> CameraCtrlCheckpoint:
    """Either released layout -> the pose encoder's keys and the qkv_merge weights per motion module."""
    if "pose_encoder_state_dict" in state_dict:
        merged = {**state_dict["pose_encoder_state_dict"], **state_dict.get("attention_processor_state_dict", {})}
    else:
        merged = state_dict
    encoder = {key[key.index("encoder_"):]: value for key, value in merged.items() if "encoder_" in key and
               key[key.index("encoder_"):].startswith(("encoder_conv_in", "encoder_down_"))}
    qkv = {}
    for key, value in merged.items():
        match = _QKV_MERGE.search(key)
        if match is not None:
            qkv.setdefault(match.group(1), {})[match.group(2)] = value
    if not encoder or not qkv:
        raise InvalidInput(argument, "this file is not a CameraCtrl checkpoint (it needs pose-encoder keys encoder_* and the "
                           "motion modules' qkv_merge weights)",
                           "use CameraCtrl.ckpt (pose_encoder_state_dict + attention_processor_state_dict) or "
                           "CameraCtrl_pruned.safetensors")
    if "encoder_down_attention_blocks.0.0.attention_blocks.0.pos_encoder.pe" not in encoder:
        raise InvalidInput(argument, "the pose encoder has no position table (pos_encoder.pe)", "use a complete CameraCtrl file")
    return CameraCtrlCheckpoint(encoder, qkv)


def qkv_merge_layers(checkpoint: CameraCtrlCheckpoint, operations=nn) -> dict[str, nn.Linear]:
    layers = {}
    for name, weights in checkpoint.qkv_merge.items():
        layer = operations.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        layer.load_state_dict(weights)
        layers[name] = layer
    return layers


def load_pose_encoder(checkpoint: CameraCtrlCheckpoint, argument: str = "cameractrl", operations=nn) -> CameraPoseEncoder:
    encoder = CameraPoseEncoder(checkpoint.channels, table_length=checkpoint.table_length, operations=operations)
    missing, unexpected = encoder.load_state_dict(checkpoint.encoder, strict=False)
    if missing or unexpected:
        raise InvalidInput(argument, f"the pose encoder's keys do not match CameraCtrl's ({(missing or unexpected)[0]})",
                           "use CameraCtrl.ckpt or CameraCtrl_pruned.safetensors")
    return encoder
