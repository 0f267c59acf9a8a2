"""A picture of an epipolar mask: query cells marked in the source view (left), their masks over the target view
(right), each query in its own colour with its exact epipolar line drawn through the band, so a user can see that
the mask follows the geometry."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .epipolar import EpipolarMask
from .errors import InvalidInput

PALETTE = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.45, 0.90], [0.10, 0.70, 0.20], [0.95, 0.60, 0.05],
    [0.60, 0.20, 0.80], [0.05, 0.75, 0.75], [0.85, 0.20, 0.60], [0.45, 0.35, 0.10],
])
_GAP = 8  # white pixels between the two panels
SUMMARY_ENTRIES = 1 << 26  # (query, key) entries the summary's density is computed over at most (72 x 72: all)


def pick_query_cells(mask: EpipolarMask, count: int, seed: int) -> torch.Tensor:
    """`count` distinct query cells (flattened row-major indices), seeded, avoiding the outermost ring of cells."""
    height, width = mask.query_size
    if count < 1:
        raise InvalidInput("queries", f"must be at least 1, got {count}", "show 1 to 8 query cells")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    interior = ((rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)).flatten()
    candidates = interior.nonzero()[:, 0] if interior.any() else torch.arange(height * width)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(int(seed)))
    return candidates[order[: min(count, len(candidates))]]


def render_mask_preview(
    mask: EpipolarMask,
    pair_index: int,
    query_cells: torch.Tensor,
    source_image: torch.Tensor | None = None,
    target_image: torch.Tensor | None = None,
    panel_height: int = 256,
) -> torch.Tensor:
    """(panel_height, 2 * panel_width + gap, 3) float image in [0, 1]. Images are (H, W, 3) in [0, 1], optional."""
    if not 0 <= pair_index < mask.num_pairs:
        raise InvalidInput("pair", f"pair {pair_index} does not exist; the mask has {mask.num_pairs} pairs", "pick a listed pair")
    ref_h, ref_w = mask.reference_size
    panel_width = max(1, round(panel_height * ref_w / ref_h))
    to_panel = torch.tensor([panel_width / ref_w, panel_height / ref_h])
    source = _background(source_image, mask.query_size, panel_height, panel_width)
    target = _background(target_image, mask.key_size, panel_height, panel_width)

    rows = mask.dense([pair_index], query_cells)[0]  # (n, keys): only the rows shown are built
    weights = rows.float() if mask.mode == "hard" else rows.float().exp()
    weights = weights.reshape(-1, 1, *mask.key_size)
    weights = F.interpolate(weights, size=(panel_height, panel_width), mode="nearest")[:, 0]

    ys, xs = torch.meshgrid(torch.arange(panel_height) + 0.5, torch.arange(panel_width) + 0.5, indexing="ij")
    query_h, query_w = mask.query_size
    centres = torch.stack([
        (query_cells % query_w + 0.5) * ref_w / query_w,
        (query_cells // query_w + 0.5) * ref_h / query_h,
    ], dim=-1)  # reference pixels
    radius = max(3.0, panel_height / 60)
    line_map = mask.line_maps[pair_index].float()
    for i, centre in enumerate(centres):
        colour = PALETTE[i % len(PALETTE)]
        target = target * (1 - 0.55 * weights[i, ..., None]) + colour * 0.55 * weights[i, ..., None]
        # exact epipolar line of the cell centre, converted to panel pixels: a x + b y + c = 0 in reference pixels
        a, b, c = (line_map @ torch.tensor([centre[0], centre[1], 1.0])).tolist()
        norm = (a * a / to_panel[0] ** 2 + b * b / to_panel[1] ** 2) ** 0.5
        if norm > 1e-12:
            distance = (a * xs / to_panel[0] + b * ys / to_panel[1] + c).abs() / norm
            target = torch.where((distance < 0.75)[..., None], colour * 0.6, target)
        dot = ((xs - centre[0] * to_panel[0]) ** 2 + (ys - centre[1] * to_panel[1]) ** 2).sqrt()
        source = torch.where((dot < radius + 1.5)[..., None], torch.zeros(3), source)
        source = torch.where((dot < radius)[..., None], colour, source)
    gap = torch.ones(panel_height, _GAP, 3)
    return torch.cat([source, gap, target], dim=1).clamp(0, 1)


def pair_density(mask: EpipolarMask, pair_index: int) -> tuple[float, int]:
    """(density of the pair's mask, query rows it was computed over): exact over every row when the pair has at
    most SUMMARY_ENTRIES entries, else estimated from that many entries' worth of rows spread over the map, so a
    preview at any feature size costs about the same."""
    rows = min(mask.num_queries, max(1, SUMMARY_ENTRIES // mask.num_keys))
    return float(mask.density([pair_index], max_queries=rows)[0]), rows


def _background(image: torch.Tensor | None, cells: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """The view's image resized to the panel, or a light checkerboard of the feature cells when there is none."""
    if image is not None:
        if image.ndim != 3 or image.shape[-1] < 3:
            raise InvalidInput("images", f"expected (H, W, 3) images, got {tuple(image.shape)}", "connect an IMAGE batch")
        resized = F.interpolate(image[..., :3].permute(2, 0, 1)[None].float(), size=(height, width), mode="bilinear", align_corners=False)
        return resized[0].permute(1, 2, 0).clamp(0, 1)
    rows = (torch.arange(height) * cells[0] // height)[:, None]
    cols = (torch.arange(width) * cells[1] // width)[None, :]
    checker = ((rows + cols) % 2).float()
    return (0.88 + 0.06 * checker)[..., None].expand(height, width, 3).clone()
