"""ComfyUI's UNet forward (openaimodel.UNetModel._forward) cut into a few runs of blocks that compile apart.

Why: inductor compiles one graph on one CPU core (tracing, lowering, scheduling and code generation are Python),
so a whole UNet takes 1.5-2 minutes to compile however many cores the machine has. Cut into pieces, each piece
compiles in a process of its own and the pieces of both models compile side by side (MV4D Compile and Keep
beside the run). A piece holds references to the UNet's own blocks (not copies), so weight patches reach it, and
what it computes is the forward's own loop over those blocks, in the same order: run one after the other, the
pieces give the UNet's prediction bit for bit (tests/host/test_host_compile_and_keep.py).

Only what the compiled calls may meet is mirrored: no ControlNet, no transformer patches (MV4D Compile and Keep's
rules leave such calls to the UNet's own forward), and the transformer_options keys the forward sets.
"""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


class UNetPiece(torch.nn.Module):
    """A run of the UNet's blocks, in the forward's order. The first piece also embeds the timesteps (and the
    label), the last one applies the output layers. Its simple attributes say which blocks it runs, so they are
    part of its fingerprint (the compiled file's key)."""

    def __init__(self, unet: torch.nn.Module, blocks: list[tuple[str, int]], first: bool, last: bool,
                 transformer_index: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList([block_of(unet, kind, index) for kind, index in blocks])
        self.block_names = ",".join(f"{kind}:{index}" for kind, index in blocks)
        self.first, self.last, self.transformer_index = first, last, transformer_index
        self.model_channels, self.default_num_video_frames = unet.model_channels, unet.default_num_video_frames
        self.class_conditional = unet.num_classes is not None
        if first:
            self.time_embed = unet.time_embed
            if self.class_conditional:
                self.label_emb = unet.label_emb
        if last:
            self.out = unet.out
        inputs = sum(kind == "input" for kind, _ in blocks)
        outputs = sum(kind == "output" for kind, _ in blocks)
        self.skips_taken = max(0, outputs - inputs)  # skips of earlier pieces its output blocks take (the last ones)

    def block_list(self) -> list[tuple[str, int]]:
        return [(kind, int(index)) for kind, index in (name.split(":") for name in self.block_names.split(","))]

    def forward(self, h, skips: list, emb, timesteps, y, context, tensor_kwargs: dict, static: dict):
        """h: the UNet's x (first piece) or the previous piece's output; skips: the `skips_taken` last skip
        connections of earlier pieces; static: the call's plain keyword arguments, the call's x shape and dtype, and
        the shape of the skip left below the taken ones (the last upsampling's output size). Returns the output,
        the skips this piece leaves for later pieces, and the embedding."""
        kwargs = {**static["kwargs"], **tensor_kwargs}
        num_video_frames = kwargs.get("num_video_frames", self.default_num_video_frames)
        image_only_indicator = kwargs.get("image_only_indicator", None)
        time_context = kwargs.get("time_context", None)
        options = {"original_shape": list(static["x_shape"]), "transformer_index": self.transformer_index}
        if self.first:
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(h.dtype))
            if self.class_conditional:
                emb = emb + self.label_emb(y)
        stack = list(skips)
        for (kind, index), block in zip(self.block_list(), self.blocks):
            options["block"] = (kind, index)
            output_shape = None
            if kind == "output":
                h = torch.cat([h, stack.pop()], dim=1)
                output_shape = stack[-1].shape if stack else static["skip_below"]
            h = forward_timestep_embed(block, h, emb, context, options, output_shape, time_context=time_context,
                                       num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)
            if kind == "input":
                stack.append(h)
        if self.last:
            h = self.out(h.type(getattr(torch, static["x_dtype"])))
        return h, stack, emb if self.first else None  # later pieces hand the embedding on unchanged: not returned,
        # so no output of the compiled graph is one of its inputs


def piece_forward(module: UNetPiece, h, skips, emb, timesteps, y, context, tensor_kwargs, static):
    """What is compiled for a piece (module level, so saved code can refer to it; the module comes first, see
    kernels/precompile.py)."""
    return module(h, skips, emb, timesteps, y, context, tensor_kwargs, static)


def block_of(unet, kind: str, index: int) -> torch.nn.Module:
    return unet.middle_block if kind == "middle" else getattr(unet, f"{kind}_blocks")[index]


def can_cut(unet: torch.nn.Module) -> bool:
    """ComfyUI's UNetModel, the class whose forward this mirrors (SD1.x / SDXL / SVD / SV3D / MVDream-style
    UNets); other diffusion models compile whole."""
    return (type(unet).__name__ == "UNetModel" and all(hasattr(unet, name) for name in BLOCK_LISTS)
            and unet.middle_block is not None and not unet.predict_codebook_ids)


def cut_unet(unet: torch.nn.Module, pieces: int) -> list[UNetPiece] | None:
    """The UNet as `pieces` runs of blocks of about equal compile work (counted in submodules: the trace and the
    code inductor generates grow with the operations), or None where it is compiled whole (one piece asked, or
    a model this does not mirror)."""
    if pieces <= 1 or not can_cut(unet):
        return None
    blocks = ([("input", index) for index in range(len(unet.input_blocks))] + [("middle", 0)]
              + [("output", index) for index in range(len(unet.output_blocks))])
    pieces = min(pieces, len(blocks))
    work = [sum(1 for _ in block_of(unet, *block).modules()) for block in blocks]
    before = [sum(work[:position]) for position in range(len(blocks) + 1)]  # work before each cut position
    cuts: list[int] = []
    for number in range(1, pieces):  # each cut nearest its share, leaving a block for every piece after it
        positions = range(cuts[-1] + 1 if cuts else 1, len(blocks) - (pieces - number) + 1)
        cuts.append(min(positions, key=lambda position: abs(before[position] - before[-1] * number / pieces)))
    bounds = [0, *cuts, len(blocks)]
    result, transformers = [], 0
    for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
        run = blocks[start:end]
        result.append(UNetPiece(unet, run, first=number == 0, last=number == len(bounds) - 2,
                                transformer_index=transformers))
        transformers += sum(transformer_count(block_of(unet, *block)) for block in run)
    return result


def transformer_count(block) -> int:
    """How many transformers a block holds (forward_timestep_embed counts them in transformer_options; the video
    transformer is a SpatialTransformer too)."""
    return sum(isinstance(layer, SpatialTransformer) for layer in block)


class PieceRun:
    """The state carried from piece to piece through one UNet call: the output so far, the skip connections not yet
    taken, the embedding."""

    def __init__(self, x: torch.Tensor):
        self.h, self.skips, self.emb, self.x = x, [], None, x

    def arguments(self, piece: UNetPiece, timesteps, y, context, tensor_kwargs: dict, static_kwargs: dict) -> tuple:
        """piece_forward's arguments after the module."""
        taken = piece.skips_taken
        left = self.skips[:len(self.skips) - taken]
        static = {"kwargs": static_kwargs, "x_shape": list(self.x.shape),
                  "x_dtype": str(self.x.dtype).removeprefix("torch."),
                  "skip_below": list(left[-1].shape) if left else None}
        return (self.h, self.skips[len(left):], self.emb, timesteps if piece.first else None,
                y if piece.first else None, context, tensor_kwargs, static)

    def advance(self, piece: UNetPiece, result) -> None:
        h, left_by_piece, emb = result
        self.skips = self.skips[:len(self.skips) - piece.skips_taken] + list(left_by_piece)
        self.h = h
        if emb is not None:
            self.emb = emb
