"""One rasterisation entry point, two backends with the same inputs and outputs:

- "gsplat": gsplat's CUDA rasteriser (fast; needs a CUDA GPU, and compiles its kernels on first use);
- "torch": a dense per-pixel compositor in plain PyTorch on top of gsplat's PyTorch projection, following the
  CUDA kernel's rules exactly (16-pixel tiles, opacity-aware 3.33-sigma boxes, alpha clamped to 0.999, alphas
  under 1/255 skipped, front-to-back until transmittance would drop to 1e-4). Slow, but correct on any device:
  the reference for tests and the path for CPU-only machines and small previews.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InvalidInput
from ..memory import check_memory
from .model import GaussianFrame

Backend = Literal["auto", "gsplat", "torch"]
TILE_SIZE = 16
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
MIN_TRANSMITTANCE = 1e-4
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
EPS_2D = 0.3  # pixels^2 of blur added to every projected covariance (3DGS / gsplat "classic")
_TORCH_CHUNK_BYTES = 256 * 2**20
_BYTES_PER_ENTRY = 48  # float32 intermediates alive per (pixel, listed Gaussian) entry of one block
GRAD_BYTES_PER_ENTRY = 160  # what a step keeps per (pixel, listed Gaussian) entry for its backward pass (bench/memory_constants.py: 123-129)
TORCH_FIT_FIX = ("lower initial_gaussians, max_gaussians or resolution (the PyTorch rasteriser keeps every pixel x Gaussian "
                 "overlap of a step for its gradients), or run on a CUDA GPU")


@dataclass
class RenderOutput:
    colors: torch.Tensor  # (C, H, W, 3)
    alphas: torch.Tensor  # (C, H, W, 1)
    info: dict  # means2d (C, N, 2, with gradient), radii (C, N, 2), width, height, n_cameras: what densification reads


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "torch"
    if backend not in ("gsplat", "torch"):
        raise InvalidInput("backend", f"unknown rasteriser {backend!r}", "use auto, gsplat or torch")
    if backend == "gsplat" and device.type != "cuda":
        raise InvalidInput("backend", "gsplat's rasteriser needs a CUDA GPU, and the Gaussians are on the CPU",
                           "use the torch backend (slow) or run on a CUDA GPU")
    return backend


def render(
    frame: GaussianFrame,
    world_to_camera: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor,
    backend: Backend = "auto",
) -> RenderOutput:
    """Render one set of Gaussians from C cameras: world_to_camera (C, 4, 4), intrinsics (C, 3, 3) in pixels of
    width x height, background (3,) RGB. Colours are composited over the background."""
    device = frame.means.device
    viewmats = world_to_camera.to(device, torch.float32)
    Ks = intrinsics.to(device, torch.float32)
    background = background.to(device, torch.float32)
    if resolve_backend(backend, device) == "gsplat":
        return _render_gsplat(frame, viewmats, Ks, width, height, background)
    return _render_torch(frame, viewmats, Ks, width, height, background)


def _render_gsplat(frame, viewmats, Ks, width, height, background) -> RenderOutput:
    try:
        from gsplat import rasterization
    except ImportError as error:  # gsplat is a declared dependency, but may be missing or broken in a given env
        raise RuntimeError(
            f"gsplat cannot be imported ({error}). Install it with 'pip install gsplat' in ComfyUI's Python; it "
            "compiles its CUDA kernels on first use and needs the CUDA toolkit (nvcc). Or use the torch backend."
        ) from error
    from gsplat import spherical_harmonics

    # Colours from SH here rather than inside rasterization(): it finds camera centres with torch.inverse, which
    # synchronises with the GPU (about 1 ms a call); the centre of a rigid view matrix is simply -R^T t.
    directions = frame.means[None] - camera_centres(viewmats)[:, None]  # (C, N, 3)
    sh = frame.sh.expand(len(viewmats), -1, -1, -1)
    colours = (spherical_harmonics(frame.sh_degree, directions, sh) + 0.5).clamp_min(0.0)
    try:
        colors, alphas, info = rasterization(
            frame.means, frame.quats, frame.scales, frame.opacities, colours, viewmats, Ks, width, height,
            sh_degree=None, backgrounds=background.expand(len(viewmats), 3), packed=False,
            near_plane=NEAR_PLANE, far_plane=FAR_PLANE, eps2d=EPS_2D, rasterize_mode="classic",
        )
    except (RuntimeError, OSError) as error:
        if "nvcc" in str(error) or "compile" in str(error).lower() or "CUDA_HOME" in str(error):
            raise RuntimeError(
                f"gsplat could not build its CUDA kernels ({error}). It needs the CUDA toolkit (nvcc) matching your "
                "torch build; install it, or use the torch backend."
            ) from error
        raise
    return RenderOutput(colors, alphas, info)


def camera_centres(viewmats: torch.Tensor) -> torch.Tensor:
    """(C, 3) centres -R^T t of rigid world-to-camera matrices (C, 4, 4)."""
    return -(viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:4])[..., 0]


def _projection():
    try:
        from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _spherical_harmonics, _world_to_cam
    except ImportError as error:
        raise RuntimeError(
            f"the torch rasteriser uses gsplat's PyTorch projection (gsplat 1.5), which cannot be imported ({error}); "
            "install gsplat>=1.5 with 'pip install gsplat'"
        ) from error
    return _quat_scale_to_covar_preci, _world_to_cam, _persp_proj, _spherical_harmonics


def project(frame: GaussianFrame, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int) -> dict:
    """gsplat's projection with the CUDA kernel's culling and opacity-aware bounding boxes. All (C, N, ...)."""
    quat_scale_to_covar, world_to_cam, perspective, spherical_harmonics = _projection()
    covars, _ = quat_scale_to_covar(frame.quats, frame.scales, True, False, triu=False)
    means_cam, covars_cam = world_to_cam(frame.means, covars, viewmats)
    means2d, cov2d = perspective(means_cam, covars_cam, Ks, width, height)
    cov2d = cov2d + EPS_2D * torch.eye(2, device=cov2d.device, dtype=cov2d.dtype)
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([cov2d[..., 1, 1] / safe_det, -cov2d[..., 0, 1] / safe_det, cov2d[..., 0, 0] / safe_det], dim=-1)
    depths = means_cam[..., 2]
    opacities = frame.opacities.expand_as(depths)
    with torch.no_grad():
        visible_enough = opacities >= ALPHA_THRESHOLD
        extend = torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp(max=3.33)
        radius = torch.ceil(extend[..., None] * torch.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], -1).clamp_min(0).sqrt())
        inside = (
            (means2d[..., 0] + radius[..., 0] > 0) & (means2d[..., 0] - radius[..., 0] < width)
            & (means2d[..., 1] + radius[..., 1] > 0) & (means2d[..., 1] - radius[..., 1] < height)
        )
        valid = (det > 0) & (depths > NEAR_PLANE) & (depths < FAR_PLANE) & visible_enough & inside & (radius > 0).any(-1)
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).int()
    directions = frame.means[None] - camera_centres(viewmats)[:, None]
    sh = frame.sh.expand(len(viewmats), -1, -1, -1)
    colours = (spherical_harmonics(frame.sh_degree, directions, sh) + 0.5).clamp_min(0.0)
    return {"means2d": means2d, "conics": conics, "depths": depths, "opacities": opacities, "radii": radii, "colours": colours}


def _render_torch(frame, viewmats, Ks, width, height, background) -> RenderOutput:
    projected = project(frame, viewmats, Ks, width, height)
    colours_out, alphas_out = [], []
    for camera in range(len(viewmats)):
        colour, alpha = _composite(
            projected["means2d"][camera], projected["conics"][camera], projected["opacities"][camera],
            projected["colours"][camera], projected["depths"][camera], projected["radii"][camera], width, height, background,
        )
        colours_out.append(colour)
        alphas_out.append(alpha)
    info = {
        "means2d": projected["means2d"], "radii": projected["radii"], "width": width, "height": height,
        "n_cameras": len(viewmats), "gaussian_ids": None,
    }
    return RenderOutput(torch.stack(colours_out), torch.stack(alphas_out), info)


def _composite(means2d, conics, opacities, colours, depths, radii, width, height, background):
    """Front-to-back alpha compositing of one camera's Gaussians, gsplat's CUDA rules: every Gaussian is listed in
    the 16 x 16 tiles its box touches, each tile blends its own list in depth order.

    Memory is bounded by blocks: a few tiles at a time, and within them at most `block` Gaussians of each tile's
    list at a time (a tile may hold every Gaussian of the scene), carrying the transmittance from block to block.
    With gradients on, autograd keeps every block's intermediates for the backward pass: that total is checked
    against free memory before the first block."""
    device = means2d.device
    pixels = TILE_SIZE * TILE_SIZE
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    tile_ids, gaussian_ids = _tile_lists(means2d, radii, depths, tiles_x, tiles_y)
    colour = torch.zeros(tiles_y * tiles_x, pixels, 3, device=device)
    transmittance = torch.ones(tiles_y * tiles_x, pixels, 1, device=device)
    if len(tile_ids):
        if torch.is_grad_enabled() and means2d.requires_grad:
            check_memory("gaussians", GRAD_BYTES_PER_ENTRY * pixels * len(tile_ids),
                         f"a step of the PyTorch rasteriser ({len(tile_ids)} tile listings of Gaussians, with gradients)",
                         TORCH_FIT_FIX, device)
        counts = torch.bincount(tile_ids, minlength=tiles_x * tiles_y)
        starts = torch.cumsum(counts, 0) - counts
        block = min(int(counts.max()), max(1, _TORCH_CHUNK_BYTES // (_BYTES_PER_ENTRY * pixels)))
        tiles_per_chunk = max(1, _TORCH_CHUNK_BYTES // (_BYTES_PER_ENTRY * pixels * block))
        local_y, local_x = torch.meshgrid(torch.arange(TILE_SIZE, device=device), torch.arange(TILE_SIZE, device=device), indexing="ij")
        for chunk in counts.nonzero()[:, 0].split(tiles_per_chunk):
            px = ((chunk % tiles_x)[:, None] * TILE_SIZE + local_x.reshape(1, -1)).float() + 0.5  # (t, 256)
            py = ((chunk // tiles_x)[:, None] * TILE_SIZE + local_y.reshape(1, -1)).float() + 0.5
            through_all = torch.ones(len(chunk), pixels, 1, device=device)  # product over every Gaussian so far
            left = torch.ones(len(chunk), pixels, 1, device=device)  # product over those blended
            blended = torch.zeros(len(chunk), pixels, 3, device=device)
            for first in range(0, int(counts[chunk].max()), block):
                slots = torch.arange(first, first + block, device=device)
                present = slots[None] < counts[chunk][:, None]  # (t, b); the rest is padding
                ids = gaussian_ids[(starts[chunk][:, None] + slots[None]).clamp(max=len(gaussian_ids) - 1)]
                dx = means2d[ids, 0][:, None, :] - px[..., None]  # (t, 256, b)
                dy = means2d[ids, 1][:, None, :] - py[..., None]
                conic = conics[ids][:, None]  # (t, 1, b, 3)
                sigma = 0.5 * (conic[..., 0] * dx * dx + conic[..., 2] * dy * dy) + conic[..., 1] * dx * dy
                alpha = (opacities[ids][:, None, :] * torch.exp(-sigma)).clamp(max=MAX_ALPHA)
                with torch.no_grad():
                    used = present[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
                alpha = torch.where(used, alpha, torch.zeros_like(alpha))
                through = through_all * torch.cumprod(1 - alpha, dim=-1)  # transmittance after each Gaussian
                with torch.no_grad():
                    included = through > MIN_TRANSMITTANCE  # the CUDA loop stops before the Gaussian that would cross 1e-4
                before = torch.cat([through_all, through[..., :-1]], dim=-1)
                weight = torch.where(included, alpha * before, torch.zeros_like(alpha))
                blended = blended + weight @ colours[ids]
                left = left * torch.where(included, 1 - alpha, torch.ones_like(alpha)).prod(dim=-1, keepdim=True)
                through_all = through[..., -1:]
                if not bool((through_all > MIN_TRANSMITTANCE).any()):
                    break  # every pixel of these tiles is saturated: the rest of their lists is never blended
            colour = colour.index_put((chunk,), blended)
            transmittance = transmittance.index_put((chunk,), left)
    image = colour + transmittance * background
    image = image.reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, 3).permute(0, 2, 1, 3, 4)
    image = image.reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, 3)[:height, :width]
    alpha = (1 - transmittance).reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, 1).permute(0, 2, 1, 3, 4)
    alpha = alpha.reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, 1)[:height, :width]
    return image, alpha


@torch.no_grad()
def _tile_lists(means2d, radii, depths, tiles_x, tiles_y) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile id, Gaussian id) of every listing, sorted by tile then depth: gsplat's isect_tiles + sort.
    A Gaussian is listed in the tiles [floor((x - r) / 16), ceil((x + r) / 16)) in each axis, clipped to the image."""
    valid = (radii > 0).all(-1).nonzero()[:, 0]
    if len(valid) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=means2d.device)
        return empty, empty
    centre, radius = means2d[valid].detach(), radii[valid].float()
    lower = torch.floor((centre - radius) / TILE_SIZE)
    upper = torch.ceil((centre + radius) / TILE_SIZE)
    limits = torch.tensor([tiles_x, tiles_y], device=centre.device)
    lower = torch.minimum(lower.clamp_min(0), limits).long()
    upper = torch.minimum(upper.clamp_min(0), limits).long()
    span = upper - lower  # (G, 2) tiles covered in x and y
    listings = span[:, 0] * span[:, 1]
    owner = torch.repeat_interleave(torch.arange(len(valid), device=centre.device), listings)
    offset = torch.arange(len(owner), device=centre.device) - torch.repeat_interleave(torch.cumsum(listings, 0) - listings, listings)
    tile_x = lower[owner, 0] + offset % span[owner, 0]
    tile_y = lower[owner, 1] + offset // span[owner, 0]
    tile = tile_y * tiles_x + tile_x
    depth_rank = torch.empty_like(valid)
    depth_rank[torch.argsort(depths[valid], stable=True)] = torch.arange(len(valid), device=centre.device)
    order = torch.argsort(tile * len(valid) + depth_rank[owner], stable=True)
    return tile[order], valid[owner[order]]
