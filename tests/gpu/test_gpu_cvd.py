"""CVD's synchronisation module on the GPU in half precision, against the CPU in float32: dense masks kept on the
GPU and masks rebuilt block by block give the same result."""

import copy

import torch

from mv4d.kernels.cameras import CameraRig, orbit_rig
from mv4d.kernels.grid import Grid
from mv4d.kernels.models.cvd import CrossVideoCall, CrossVideoMasks, CVDModel, partners_for_step
from mv4d.kernels.models.motion import ModuleCall


def test_the_module_on_cuda_matches_the_cpu():
    videos, frames = 4, 3
    rigs = [orbit_rig(frames, 10.0, 2.0, 40.0, 256, 256, 90.0 * video, span_deg=30.0) for video in range(videos)]
    cameras = CameraRig(torch.cat([rig.world_to_camera for rig in rigs]), torch.cat([rig.intrinsics for rig in rigs]), 256, 256)
    grid = Grid(videos, frames)
    module = CVDModel((64, 64, 128, 128)).by_motion_module()["down_blocks.0.motion_modules.0"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(1, parameter.shape[-1]) ** 0.5)
    x = torch.randn(2 * grid.cells, 64, 32, 32, generator=generator)
    partners = partners_for_step(videos, 0, 3)
    on_gpu = copy.deepcopy(module).cuda().half()
    for mode in ("soft", "hard"):
        with torch.no_grad():
            reference = module(x, ModuleCall(grid, cross_video=CrossVideoCall(partners, CrossVideoMasks(cameras, grid, mode))))
            results = []
            for budget in (2**30, 0):  # kept dense on the GPU, or rebuilt in blocks at every call
                masks = CrossVideoMasks(cameras, grid, mode, max_dense_bytes=budget)
                call = ModuleCall(grid, cross_video=CrossVideoCall(partners, masks, 2**24))
                results.append(on_gpu(x.cuda().half(), call).float().cpu())
        scale = float(reference.abs().max())
        for result in results:
            assert torch.isfinite(result).all()
            assert float((result - reference).abs().max()) < 2e-2 * scale
        assert float((results[0] - results[1]).abs().max()) < 1e-2 * scale
