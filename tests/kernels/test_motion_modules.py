"""AnimateDiff motion modules in plain PyTorch: the position table, the grid folds (views never mix), the key maps."""

import math

import pytest
import torch

from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.grid import Grid
from mv4d.kernels.models.cameractrl import CameraPoseEncoder, trajectory_rays
from mv4d.kernels.models.motion import ModuleCall, MotionModule, normalize_motion_state_dict, position_table
from mv4d.kernels.cameras import orbit_rig


def random_module(channels=32, length=32, seed=0):
    torch.manual_seed(seed)
    module = MotionModule(channels, length)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return module.eval()


def test_position_table_is_animatediffs_sinusoid():
    table = position_table(32, 8)
    assert table.shape == (1, 32, 8)
    assert math.isclose(float(table[0, 5, 2]), math.sin(5 * math.exp(-2 * math.log(10000.0) / 8)), rel_tol=1e-6)
    assert math.isclose(float(table[0, 5, 3]), math.cos(5 * math.exp(-2 * math.log(10000.0) / 8)), rel_tol=1e-6)


def test_on_a_grid_frames_of_a_view_mix_and_views_never_do():
    grid, module = Grid(3, 4), random_module()
    x = torch.randn(2 * grid.cells, 32, 4, 4)  # cond and uncond chunks
    with torch.no_grad():
        out = module(x, ModuleCall(grid))
        changed = x.clone()
        changed[grid.index(1, 2)] += torch.randn(32, 4, 4)  # view 1, frame 2 of the first chunk (not a constant: GroupNorm takes those out)
        moved = module(changed, ModuleCall(grid))
    difference = (moved - out).abs().flatten(1).amax(1).reshape(2, 3, 4)
    assert (difference[0, 1] > 1e-4).all()  # every frame of view 1 heard of it
    assert float(difference[0, [0, 2]].max()) == 0.0 and float(difference[1].max()) == 0.0  # other views, other chunk: not


def test_frames_beyond_the_position_table_and_broken_batches_are_refused():
    module = random_module(length=8)
    with pytest.raises(InvalidInput, match="9 frames per video.*has 8"):
        module(torch.randn(9, 32, 2, 2), ModuleCall(Grid(1, 9)))
    with pytest.raises(InvalidInput, match="not a whole number"):
        module(torch.randn(7, 32, 2, 2), ModuleCall(Grid(1, 4)))


def test_diffusers_keys_map_to_animatediffs_and_their_table_length_is_read():
    diffusers = {}
    for block in range(4):
        prefix = f"down_blocks.{block}.motion_modules.0"
        diffusers[f"{prefix}.proj_in.weight"] = torch.zeros(8, 8)
        diffusers[f"{prefix}.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(8, 8)
        diffusers[f"{prefix}.transformer_blocks.0.norm3.weight"] = torch.zeros(8)
        diffusers[f"{prefix}.transformer_blocks.0.pos_embed.pe"] = torch.zeros(1, 24, 8)
    normalized, version = normalize_motion_state_dict(diffusers)
    assert "down_blocks.2.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" in normalized
    assert "down_blocks.2.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight" in normalized
    assert (version.name, version.table_length, version.source_layout) == ("v1", 24, "diffusers")


def test_pose_encoder_features_follow_the_latent_levels_and_rays_are_relative_to_each_first_camera():
    encoder = CameraPoseEncoder((32, 32, 64, 64), table_length=16).eval()
    grid = Grid(2, 3)
    cameras = orbit_rig(6, 10.0, 2.0, 40.0, 64, 64, span_deg=90.0)
    rays = trajectory_rays(cameras, grid, 64, 64)
    assert rays.shape == (6, 6, 64, 64)
    first = cameras.select([3]).plucker_rays(64, 64)
    assert not torch.allclose(rays[3], first)  # video 1's first frame is the identity camera, not its world pose
    identity = trajectory_rays(cameras.select([3, 4, 5]), Grid(1, 3), 64, 64)
    assert torch.allclose(rays[3:], identity)
    with torch.no_grad():
        features = encoder(rays, grid)
    assert [tuple(f.shape) for f in features] == [(6, 32, 8, 8), (6, 32, 4, 4), (6, 64, 2, 2), (6, 64, 1, 1)]
    with pytest.raises(InvalidInput, match="5 cameras for 2 video"):
        trajectory_rays(cameras.select(range(5)), grid, 64, 64)


def test_float32_alignment_layers_run_beside_a_bfloat16_module():
    """Trained adapters stay float32 while the UNet and its motion modules run in bf16 on a GPU: the layers are
    applied in their own dtype and the result matches the all-float32 module within bf16 rounding."""
    grid, module = Grid(2, 4), random_module()
    for name in ("align_in", "align_out"):
        layer = torch.nn.Linear(32, 32)
        torch.nn.init.normal_(layer.weight, std=0.2)
        setattr(module.temporal_transformer, name, layer)
    x = torch.randn(grid.cells, 32, 4, 4)
    with torch.no_grad():
        expected = module(x, ModuleCall(grid))
        half = random_module().to(torch.bfloat16)
        half.load_state_dict({k: v.to(torch.bfloat16) for k, v in module.state_dict().items() if ".align_" not in k}, strict=False)
        for name in ("align_in", "align_out"):
            setattr(half.temporal_transformer, name, getattr(module.temporal_transformer, name))  # float32, shared
        out = half(x.to(torch.bfloat16), ModuleCall(grid))
    assert out.dtype == torch.bfloat16
    assert float((out.float() - expected).abs().max()) < 0.05 * float(expected.abs().max())
