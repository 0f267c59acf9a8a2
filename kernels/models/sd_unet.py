"""Facts about Stable Diffusion's UNet layout (LDM key names, as ComfyUI keeps them) that the model patches need.

ComfyUI addresses a transformer block of the UNet as (block, number, index): ("input", 1, 0) is the first
BasicTransformerBlock of input block 1, ("middle", 0, 0) the middle one, ("output", 3, 0) one of output block 3;
attention replaces and per-block weights are keyed that way.
"""

from __future__ import annotations

import re
from typing import Iterable

BlockKey = tuple[str, int, int]

_TRANSFORMER_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.transformer_blocks\.(\d+)\.")
_BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_ORDER = {"input": 0, "middle": 1, "output": 2}


def block_key_of(key: str) -> tuple[BlockKey, str] | None:
    """(block key, rest of the key after the transformer block) of a UNet state-dict key, or None outside one.
    'input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight' -> (('input', 1, 0), 'attn2.to_k.weight')."""
    match = _TRANSFORMER_BLOCK.match(key)
    if match is None:
        return None
    name = _BLOCK_NAMES[match.group(1)]
    number = 0 if name == "middle" else int(match.group(2))
    return (name, number, int(match.group(4))), key[match.end():]


def transformer_block_keys(keys: Iterable[str]) -> list[BlockKey]:
    """Every transformer block of a UNet, from its state-dict keys, in forward order (input, middle, output)."""
    found = {located[0] for located in map(block_key_of, keys) if located is not None}
    return sorted(found, key=lambda block: (_ORDER[block[0]], block[1], block[2]))


def block_prefix(block: BlockKey, keys: Iterable[str]) -> str:
    """The state-dict prefix of one transformer block, e.g. 'input_blocks.1.1.transformer_blocks.0.'."""
    for key in keys:
        located = block_key_of(key)
        if located is not None and located[0] == block:
            return key[:len(key) - len(located[1])]
    raise KeyError(block)
