"""4dm.ckpt's key map without ComfyUI: motion modules by 4DM's UNet positions (any 'module.' / 'model.diffusion_model.'
prefix) to AnimateDiff's names, spatial keys unshifted to ComfyUI's layout, and what is refused."""

import sys
from pathlib import Path

import pytest
import torch

from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.models.fourdm import is_4dm_state_dict, split_4dm, unshift, with_4dm_weights
from mv4d.kernels.models.multiview import split_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from mv4d_tiny_models import FOURDM_POSITIONS, tiny_4dm_checkpoint, tiny_motion_state_dict  # noqa: E402  (torch only)


def test_motion_modules_map_from_4dms_positions_to_animatediffs_names_under_any_prefix():
    state = tiny_4dm_checkpoint()["state_dict"]
    assert is_4dm_state_dict(state) and not is_4dm_state_dict(tiny_motion_state_dict("v2"))
    for prefix in ("module.", "module.model.diffusion_model."):
        keyed = {prefix + key[len("module."):]: value for key, value in state.items()}
        file = split_4dm(keyed)
        assert file.version.name == "4dm" and file.version.table_length == 32 and file.version.mid_block and file.unet == {}
        assert len(file.motion) == len(state)
        for name, position in FOURDM_POSITIONS.items():  # the literal layout table, not the code under test
            for rest in ("temporal_transformer.proj_in.weight", "temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight"):
                assert torch.equal(file.motion[f"{name}.{rest}"], state[f"module.{position}.{rest}"]), (name, rest)


@pytest.mark.parametrize("theirs, ours", [
    ("middle_block.3.in_layers.2.weight", "middle_block.2.in_layers.2.weight"),  # [Res, ST, MM, Res]
    ("output_blocks.2.2.conv.weight", "output_blocks.2.1.conv.weight"),  # [Res, MM, Upsample]
    ("output_blocks.5.3.conv.bias", "output_blocks.5.2.conv.bias"),  # [Res, ST, MM, Upsample]
    ("output_blocks.8.3.conv.weight", "output_blocks.8.2.conv.weight"),
    ("output_blocks.11.1.proj_out.weight", "output_blocks.11.1.proj_out.weight"),  # before its module: as it is
    ("middle_block.1.proj_in.weight", "middle_block.1.proj_in.weight"),
    ("input_blocks.3.0.op.weight", "input_blocks.3.0.op.weight"),
])
def test_spatial_keys_come_back_to_comfyuis_unshifted_layout(theirs, ours):
    assert unshift(theirs) == ours
    file = split_4dm({**tiny_4dm_checkpoint()["state_dict"], f"module.{theirs}": torch.ones(2)})
    assert list(file.unet) == [ours]


def test_spatial_weights_replace_the_bases_and_foreign_ones_are_refused():
    base = {"middle_block.2.in_layers.2.weight": torch.zeros(3, 3), "out.2.bias": torch.zeros(4)}
    file = split_4dm({**tiny_4dm_checkpoint()["state_dict"], "module.middle_block.3.in_layers.2.weight": torch.ones(3, 3)})
    merged = with_4dm_weights(base, file)
    assert torch.equal(merged["middle_block.2.in_layers.2.weight"], torch.ones(3, 3)) and torch.equal(merged["out.2.bias"], torch.zeros(4))
    with pytest.raises(InvalidInput, match=r"fourdm: the file holds 1 UNet weights the ImageDream base lacks"):
        with_4dm_weights({"out.2.bias": torch.zeros(4)}, file)
    with pytest.raises(InvalidInput, match=r"middle_block\.2\.in_layers\.2\.weight has shape \(3, 3\), the base's is \(2, 2\)"):
        with_4dm_weights({"middle_block.2.in_layers.2.weight": torch.zeros(2, 2)}, file)


def test_other_files_are_refused_as_4dm_and_4dm_as_a_checkpoint():
    with pytest.raises(InvalidInput, match=r"fourdm: this file holds no 4DM motion modules"):
        split_4dm(tiny_motion_state_dict("v2"))
    with pytest.raises(InvalidInput, match=r"ckpt_name: this is 4Diffusion's 4dm\.ckpt.*it needs its base\. Fix: load it with MV4D Load 4DM"):
        split_checkpoint(tiny_4dm_checkpoint()["state_dict"])
