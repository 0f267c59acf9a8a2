"""The conditioning of Diffusion²'s grid, built from ComfyUI models but without ComfyUI's node API, so the nodes
and the benchmarks (which run where that API's own dependencies are missing) share one implementation."""

from __future__ import annotations

import torch

from ..kernels.cameras import sv3d_angles
from ..kernels.grid import Grid
from .composed_guider import GridConditioning

# ComfyUI's SV3D_p wraps azimuths with fmod(., 360), which would turn the reference view's 360 into 0; the official
# model was conditioned with 2 pi there. The float32 just below 360 survives the fmod and embeds as 2 pi.
REFERENCE_AZIMUTH = float(torch.tensor(360.0).nextafter(torch.tensor(0.0)))
# Augmentation noise on the reference pixels (as core SVD conditioning adds) from a fixed seed: same inputs, same output.
AUGMENTATION_SEED = 0


def official_sv3d_angles(cameras) -> tuple[list[float], list[float]]:
    """Elevations and azimuths of the rig in SV3D's official convention (input view last, at 360)."""
    angles = sv3d_angles(cameras)
    return angles.elevations_deg, [REFERENCE_AZIMUTH if a >= 360.0 else a for a in angles.azimuths_deg]


def encode_references(clip_vision, vae, images: torch.Tensor, augmentation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: CLIP image embedding (B, 1, D) and VAE latent of the (augmented) pixels (B, 4, h, w)."""
    embeddings = clip_vision.encode_image(images[..., :3]).image_embeds.unsqueeze(1)
    pixels = images[..., :3]
    if augmentation > 0:
        generator = torch.Generator().manual_seed(AUGMENTATION_SEED)
        pixels = pixels + torch.randn(pixels.shape, generator=generator).to(pixels) * augmentation
    return embeddings, vae.encode(pixels)


def with_unconditional(embeddings: torch.Tensor, latents: torch.Tensor, extra: dict) -> tuple[list, list]:
    """(positive, negative) CONDITIONING; the negative is the zero image, as in core SVD / SV3D conditioning."""
    return ([[embeddings, {"concat_latent_image": latents, **extra}]],
            [[torch.zeros_like(embeddings), {"concat_latent_image": torch.zeros_like(latents), **extra}]])


def sv3d_conditioning(embedding, latent, elevations: list[float], azimuths: list[float], augmentation: float) -> tuple[list, list]:
    return with_unconditional(embedding, latent, {"elevation": elevations, "azimuth": azimuths, "augmentation_level": augmentation})


def grid_conditioning(view_embeddings, view_latents, frame_embeddings, frame_latents, elevations: list[float],
                      azimuths: list[float], fps: int, motion_bucket_id: int, video_augmentation: float,
                      multiview_augmentation: float) -> GridConditioning:
    """Row v on reference view v (video model, view-major), column f on reference frame f (multi-view model,
    column-major, per-view angles tiled per column). Every per-item tensor is full length: ComfyUI's
    resize_to_batch_size would stretch a shorter one ([a0, a0, a1, a1, ...]), not tile it."""
    views, frames = len(view_embeddings), len(frame_embeddings)
    grid = Grid(views, frames)
    video = with_unconditional(grid.per_view(view_embeddings), grid.per_view(view_latents),
                               {"fps": fps, "motion_bucket_id": motion_bucket_id, "augmentation_level": video_augmentation})

    def column_major_per_frame(values):
        return grid.column_major(grid.per_frame(values))

    def column_major_per_view(values: list[float]) -> list[float]:
        return grid.column_major(grid.per_view(torch.tensor(values, dtype=torch.float64))).tolist()

    multiview = with_unconditional(column_major_per_frame(frame_embeddings), column_major_per_frame(frame_latents),
                                   {"elevation": column_major_per_view(elevations), "azimuth": column_major_per_view(azimuths),
                                    "augmentation_level": multiview_augmentation})
    return GridConditioning(views=views, frames=frames, latent_height=view_latents.shape[-2],
                            latent_width=view_latents.shape[-1], azimuths=azimuths, elevations=elevations,
                            video_positive=video[0], video_negative=video[1],
                            multiview_positive=multiview[0], multiview_negative=multiview[1])
