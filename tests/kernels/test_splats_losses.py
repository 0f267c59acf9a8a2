import pytest
import torch
from kornia.metrics import ssim as kornia_ssim
from safetensors.torch import save_file

from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.splats.losses import LPIPS, _CHANNELS, load_lpips, photometric_loss, psnr, ssim_map


def test_our_ssim_is_kornias_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    render = torch.rand(2, 3, 37, 45, generator=generator, requires_grad=True)
    target = (render.detach() + 0.1 * torch.randn(2, 3, 37, 45, generator=generator)).clamp(0, 1)
    ours, theirs = ssim_map(render, target), kornia_ssim(render, target, 11)
    assert torch.allclose(ours, theirs, atol=1e-5)
    grad_ours = torch.autograd.grad(ours.mean(), render)[0]
    grad_theirs = torch.autograd.grad(theirs.mean(), render)[0]
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-7)


def test_losses_are_zero_for_perfect_renders_and_confidence_weighting_favours_consistent_images():
    target = torch.rand(2, 16, 16, 3)
    assert float(photometric_loss(target, target)) == pytest.approx(0, abs=1e-6)
    slightly, badly = (target + 0.02).clamp(0, 1), torch.rand(2, 16, 16, 3)
    render = torch.cat([slightly[:1], badly[1:]]).requires_grad_(True)
    photometric_loss(render, target, confidence=True).backward()
    per_image = render.grad.abs().flatten(1).sum(1)
    plain = torch.cat([slightly[:1], badly[1:]]).requires_grad_(True)
    photometric_loss(plain, target, ssim_weight=1.0).backward()
    # the badly matching image gets relatively less say than without confidence weighting
    assert per_image[1] / per_image[0] < plain.grad.abs().flatten(1).sum(1)[1] / plain.grad.abs().flatten(1).sum(1)[0]
    assert float(psnr(target, target + 0.1)) == pytest.approx(20.0, abs=1e-4)


def fake_lpips_files(tmp_path):
    """Random weights in the layouts of torchvision's vgg16 file and LPIPS' v0.1 vgg.pth (none can be downloaded)."""
    model = LPIPS()
    generator = torch.Generator().manual_seed(0)
    backbone = {f"features.{k}": torch.randn(v.shape, generator=generator) * 0.05 for k, v in model.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has the classifier too
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(_CHANNELS)}
    torch.save(backbone, tmp_path / "vgg16-397923af.pth")
    save_file(heads, str(tmp_path / "lpips_vgg.safetensors"))
    return tmp_path / "vgg16-397923af.pth", tmp_path / "lpips_vgg.safetensors"


def test_lpips_loads_user_weights_and_measures_distance(tmp_path):
    lpips = load_lpips(*fake_lpips_files(tmp_path))
    images = torch.rand(2, 32, 32, 3)
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-6)
    render = (images + 0.2 * torch.randn_like(images)).clamp(0, 1).requires_grad_(True)
    distance = lpips(render, images)
    assert (distance > 0).all()
    distance.sum().backward()
    assert render.grad.abs().sum() > 0


def test_lpips_refuses_files_without_the_expected_weights(tmp_path):
    backbone, heads = fake_lpips_files(tmp_path)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "broken.pth")
    with pytest.raises(InvalidInput, match="lacks VGG16 weights"):
        load_lpips(tmp_path / "broken.pth", heads)
    with pytest.raises(InvalidInput, match="lin0.model.1.weight"):
        load_lpips(backbone, backbone)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_lpips(tmp_path / "missing.pth", heads)
