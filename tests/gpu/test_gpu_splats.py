"""gsplat's CUDA rasteriser against our PyTorch one, and the fit on the GPU."""

import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.splats.losses import psnr
from mv4d.kernels.splats.model import GaussianFrame
from mv4d.kernels.splats.rasterize import render


def random_frame(count: int, sh_degree: int, generator: torch.Generator) -> GaussianFrame:
    """Gaussians of mixed sizes, shapes, orientations and opacities around the origin."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    means = (rand(count, 3) - 0.5) * 0.9
    quats = torch.randn(count, 4, generator=generator)
    scales = torch.exp(torch.log(torch.tensor(0.002)) + rand(count, 3) * torch.log(torch.tensor(20.0)))
    opacities = rand(count) ** 0.5
    sh = torch.randn(count, (sh_degree + 1) ** 2, 3, generator=generator) * torch.tensor([1.0] + [0.3] * ((sh_degree + 1) ** 2 - 1))[None, :, None]
    return GaussianFrame(means.cuda(), (quats / quats.norm(dim=-1, keepdim=True)).cuda(), scales.cuda(), opacities.cuda(), sh.cuda(), sh_degree)


def test_torch_and_gsplat_renderers_agree():
    generator = torch.Generator().manual_seed(0)
    rig = orbit_rig(3, elevation_deg=20.0, radius=2.0, fov_deg=40.0, height=240, width=320)
    background = torch.tensor([1.0, 1.0, 1.0])
    for count, sh_degree in ((20_000, 0), (20_000, 1), (5_000, 3)):
        frame = random_frame(count, sh_degree, generator)
        reference = render(frame, rig.world_to_camera, rig.intrinsics, 320, 240, background, "torch")
        fast = render(frame, rig.world_to_camera, rig.intrinsics, 320, 240, background, "gsplat")
        agreement = float(psnr(reference.colors, fast.colors))
        print(f"\n{count} Gaussians, SH {sh_degree}: torch vs gsplat PSNR {agreement:.1f} dB, "
              f"alpha max diff {float((reference.alphas - fast.alphas).abs().max()):.2e}")
        assert agreement >= 60.0
        assert torch.equal(reference.info["radii"].cpu(), fast.info["radii"].cpu())


def test_a_gsplat_fit_on_the_gpu_improves_on_its_start():
    from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
    from mv4d.kernels.splats.init import initial_gaussians
    from mv4d.kernels.splats.model import MotionConfig
    from mv4d.kernels.splats.views import grid_request, render_images
    from mv4d.kernels.synthetic_scene import example_multiview_video

    rig = orbit_rig(6, height=96, width=96, sv3d_order=True)
    video = example_multiview_video(rig, 4, perturbation=0.0)

    def score(gaussians):
        cameras, times = grid_request(rig, video.times)
        images = render_images(gaussians.to("cuda"), cameras, times, torch.ones(3))
        return float(psnr(images, video.images.reshape(-1, 96, 96, 3)))

    result = fit_dynamic_gaussians(video, FitSettings(iterations=500, initial_gaussians=2000, views_per_step=3), "cuda")
    start = initial_gaussians(video, 2000, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0), time_window=0.1)
    assert result.backend == "gsplat"
    assert score(result.gaussians) >= score(start) + 5.0


def test_fit_targets_converted_on_the_gpu_match_the_cpu_conversion():
    """The fit's targets are resized and quantised where the fit runs; the GPU's rounding may move a value by one
    level of 255 at most, against the same function run on the CPU."""
    from mv4d.kernels.multiview_video import MultiviewVideo, even_times
    from mv4d.kernels.splats.fit import fit_targets

    rig = orbit_rig(3, height=96, width=80)
    images = torch.rand(3, 4, 96, 80, 3, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of [0, 1]
    video = MultiviewVideo(images, rig, even_times(4))
    for height, width in ((96, 80), (60, 50)):
        on_gpu = fit_targets(video, height, width, torch.device("cuda"))
        on_cpu = fit_targets(video, height, width, torch.device("cpu"))
        apart = (on_gpu.cpu().int() - on_cpu.int()).abs()
        print(f"\n{height}x{width}: {int((apart > 0).sum())} of {apart.numel()} values one level apart")
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == (3, 4, height, width, 3)
        assert int(apart.max()) <= 1
        if (height, width) == (96, 80):
            assert torch.equal(on_gpu.cpu(), on_cpu)  # no resize: clamping and rounding only, exact on both
