"""Photometric losses for fitting Gaussians to generated images.

- default: (1 - w) L1 + w D-SSIM with D-SSIM = 1 - SSIM (3DGS, w = 0.2). (kornia's ssim_loss would give
  (1 - SSIM) / 2.)
- confidence (Diffusion²): lambda_ssim C_ssim D-SSIM + lambda_lpips C_lpips LPIPS, no L1, with per-image
  confidences C_ssim = SSIM(target, render) and C_lpips = 1 - LPIPS, held constant (no gradient through them):
  images the Gaussians already explain get more say than inconsistent ones.
- LPIPS (VGG, v0.1) only when the user provides the weights: no package ships them and none can be downloaded
  at run time. See `load_lpips`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidInput

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


@functools.lru_cache(maxsize=8)
def _ssim_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    window = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return (window / window.sum()).to(device, dtype)


def _local_means(stack: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means of every channel of (B, C, H, W): reflected borders, two grouped 1D passes."""
    half = SSIM_WINDOW // 2
    window = _ssim_window(stack.device, stack.dtype)
    groups = stack.shape[1]
    stack = F.pad(stack, (half, half, half, half), mode="reflect")
    stack = F.conv2d(stack, window.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    return F.conv2d(stack, window.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)


def ssim_map(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM map of (B, C, H, W) images in [0, 1]: the same numbers as kornia.metrics.ssim (11-pixel Gaussian
    window, sigma 1.5, reflected borders), with the five local moments filtered in two batched passes, and the
    target's moments outside the autograd graph (no gradient flows into a target). kornia runs ten filters and
    rebuilds its window on every call: a sixth of a 6 ms fit step."""
    channels = render.shape[1]
    mu1, square1, product = _local_means(torch.cat([render, render * render, render * target], dim=1)).split(channels, dim=1)
    with torch.no_grad():
        mu2, square2 = _local_means(torch.cat([target, target * target], dim=1)).split(channels, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    mu1_mu2 = mu1 * mu2
    numerator = (2 * mu1_mu2 + c1) * (2 * (product - mu1_mu2) + c2)
    denominator = (mu1 * mu1 + mu2 * mu2 + c1) * (square1 - mu1 * mu1 + square2 - mu2 * mu2 + c2)
    return numerator / (denominator + 1e-12)


def ssim_per_image(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean SSIM of (B, H, W, 3) images in [0, 1]."""
    return ssim_map(render.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)).mean(dim=(1, 2, 3))


def photometric_loss(render: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.2, confidence: bool = False,
                     lpips: LPIPS | None = None, lpips_weight: float = 0.0) -> torch.Tensor:
    """Scalar loss over a batch of (B, H, W, 3) renders and targets."""
    ssim = ssim_per_image(render, target)
    dssim = 1 - ssim
    perceptual = lpips(render, target) if lpips is not None and lpips_weight > 0 else None
    if confidence:
        loss = ssim_weight * ssim.detach() * dssim
        if perceptual is not None:
            loss = loss + lpips_weight * (1 - perceptual.detach()).clamp_min(0) * perceptual
        return loss.mean()
    loss = (1 - ssim_weight) * (render - target).abs().mean(dim=(1, 2, 3)) + ssim_weight * dssim
    if perceptual is not None:
        loss = loss + lpips_weight * perceptual
    return loss.mean()


def psnr(render: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; with a (..., H, W) mask, over the masked pixels only."""
    error = (render - target) ** 2
    if mask is None:
        mse = error.mean()
    else:
        weights = mask[..., None].expand_as(error)
        mse = (error * weights).sum() / weights.sum().clamp_min(1)
    return -10 * torch.log10(mse.clamp_min(1e-20))


# ---- LPIPS (VGG16 backbone + learned linear heads, v0.1), weights supplied by the user ----

_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 (torchvision indices)
_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input scaling of [-1, 1] images, from its published code
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS distance (B,) between (B, H, W, 3) images in [0, 1]; frozen."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)  # the keys match torchvision's vgg16 "features.N.*"
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([render, target]).permute(0, 3, 1, 2) * 2 - 1
        x = (both - self.shift) / self.scale
        distance = 0
        tap = 0
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index == _TAPS[tap]:
                first, second = x.chunk(2)
                first = first / (first.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                second = second / (second.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                distance = distance + self.heads[tap]((first - second) ** 2).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(_TAPS):
                    break
        return distance


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_lpips(backbone: Path, heads: Path) -> LPIPS:
    """LPIPS from torchvision's VGG16 weights (e.g. vgg16-397923af.pth, keys features.N.weight/bias) and the LPIPS
    v0.1 linear heads (lpips' weights/v0.1/vgg.pth, keys lin0.model.1.weight ... lin4.model.1.weight), each as
    .pth (read with weights_only=True) or .safetensors. Built outside inference mode (ComfyUI runs nodes in it):
    the fit differentiates through these weights."""
    with torch.inference_mode(False):
        return _load_lpips(backbone, heads)


def _load_lpips(backbone: Path, heads: Path) -> LPIPS:
    model = LPIPS()
    try:
        backbone_state = _read_state_dict(Path(backbone))
        head_state = _read_state_dict(Path(heads))
    except Exception as error:  # any unreadable file: say which one and why
        raise InvalidInput("lpips", f"cannot read the LPIPS weights ({error})", "provide vgg16 and lpips vgg.pth files") from None
    features = {key[len("features."):]: value for key, value in backbone_state.items() if key.startswith("features.")}
    wanted = model.features.state_dict()
    missing = sorted(set(wanted) - set(features))
    if missing:
        raise InvalidInput("lpips", f"{Path(backbone).name} lacks VGG16 weights {missing[:3]}...",
                           "use torchvision's vgg16 weights file (vgg16-397923af.pth)")
    model.features.load_state_dict({key: features[key] for key in wanted})
    for index in range(len(_CHANNELS)):
        key = f"lin{index}.model.1.weight"
        if key not in head_state or tuple(head_state[key].shape) != (1, _CHANNELS[index], 1, 1):
            raise InvalidInput("lpips", f"{Path(heads).name} lacks {key} of shape (1, {_CHANNELS[index]}, 1, 1)",
                               "use LPIPS' v0.1 vgg.pth")
        model.heads[index].weight.copy_(head_state[key])
    return model


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., H, W, 3) images resized with antialiasing (area-like) to height x width."""
    if images.shape[-3:-1] == (height, width):
        return images
    flat = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float()
    resized = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(*images.shape[:-3], height, width, 3)
