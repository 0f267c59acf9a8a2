"""Epipolar masks and chunked masked attention on the GPU, against the CPU."""

import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.epipolar import build_epipolar_mask, epipolar_attention


def test_masks_and_attention_on_cuda_match_the_cpu():
    rig = orbit_rig(3, height=256, width=256)
    for mode in ("hard", "soft"):
        mask = build_epipolar_mask(rig, (32, 32), mode=mode)
        assert torch.equal(mask.dense(device="cuda").cpu(), mask.dense()) if mode == "hard" else \
            torch.allclose(mask.dense(device="cuda").cpu(), mask.dense(), atol=1e-3)
        generator = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(6, 4, 1024, 32, generator=generator) for _ in range(3))
        reference = epipolar_attention(q, k, v, mask)
        fast = epipolar_attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), mask, max_mask_bytes=2**22)
        assert torch.isfinite(fast).all()
        assert (fast.float().cpu() - reference).abs().max() < 2e-2
