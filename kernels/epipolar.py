"""Epipolar attention masks between views (CVD's cross-video synchronisation), at any feature-map size.

For a pair (source view, target view), a query cell of the source feature map may attend to the key cells of the
target feature map that lie near the epipolar line of the query. Distances are measured in pixels of a
*reference* image size (CVD measures at 256 px whatever the UNet level), so one tau works for every level.

Each pair is stored in compact form, one 3x3 "line map" L with  line_in_target = L @ source_pixel  (homogeneous,
reference pixels, continuous coordinates as in `cameras.py`):

- a real pair: L is the fundamental matrix F = K_t^-T [t]x R K_s^-1 (x_t^T F x_s = 0);
- a pair without baseline (identical cameras, or a pure rotation), where F = 0: CVD's pseudo-epipolar mask, a
  line of random slope through H x, where H = K_t R K_s^-1 maps the pixel exactly (the identity for identical
  cameras). A line through H x with direction d is (H x) x d, so L = [d]x H, one seeded slope per pair;
- a pair related by a given homography H (CVD's homography-augmented monocular clips): likewise L = [d]x H.

The compact form costs 9 numbers a pair; the dense (queries x keys) mask is built only for the rows asked for
(`dense`, `sdpa_mask`), or chunk by chunk inside `epipolar_attention`, because at 128 x 128 one pair alone has
268M entries. Where the dense masks of all pairs fit in memory and are used many times (CVD: every layer and step
of a sampling run), `precomputed` builds them once (DenseEpipolarMask); `epipolar_attention` takes either form.

Two mask kinds:
- hard (the paper): a key cell is inside when some point of it lies within `tau` reference pixels of the epipolar
  line of some point of the query cell, computed exactly. Cells are areas, not points: testing only cell centres
  would drop true correspondences whenever a cell is wider than 2 tau (a 32 x 32 map at 256 px has 8 px cells).
- soft (CVD's released code, for its weights): the additive bias -(d - band).clip(0) * decay / band at cell
  centres, with band = band_fraction x the largest centre distance of the pair (CVD: 3/128 and decay 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.epipolar import cross_product_matrix

from .cameras import GEOMETRY_DTYPE, CameraRig
from .errors import InvalidInput
from .memory import check_memory

MaskMode = Literal["hard", "soft"]
CVD_REFERENCE_PIXELS = 256
CVD_BAND_FRACTION = 3 / 128
CVD_DECAY = 3.0
DEFAULT_MAX_MASK_BYTES = 256 * 2**20
_BYTES_PER_ENTRY = 20  # about the bytes of float32 products and flags alive per (query, key) entry while building
BUILD_BYTES_PER_PAIR = 2048  # building the compact masks: the pair's cameras, matrices and products (bench/memory_constants.py: 970)


@dataclass(frozen=True, eq=False)
class EpipolarMask:
    """Compact epipolar masks for P ordered view pairs; see the module docstring."""

    line_maps: torch.Tensor  # (P, 3, 3) float64, unit Frobenius norm
    pairs: torch.Tensor  # (P, 2) long: (source view, target view) indices into the cameras it was built from
    pseudo: torch.Tensor  # (P,) bool: pseudo-epipolar (no baseline, or a given homography)
    query_size: tuple[int, int]  # (height, width) of the source feature map
    key_size: tuple[int, int]  # (height, width) of the target feature map
    reference_size: tuple[int, int]  # (height, width) of the pixel grid distances are measured on
    mode: MaskMode = "hard"
    tau: float = 3.0
    band_fraction: float = CVD_BAND_FRACTION
    decay: float = CVD_DECAY

    @property
    def num_pairs(self) -> int:
        return len(self.line_maps)

    @property
    def num_queries(self) -> int:
        return self.query_size[0] * self.query_size[1]

    @property
    def num_keys(self) -> int:
        return self.key_size[0] * self.key_size[1]

    def __repr__(self) -> str:
        setting = f"tau {self.tau:g} px" if self.mode == "hard" else f"band {self.band_fraction:.4g}, decay {self.decay:g}"
        return (
            f"EpipolarMask({self.num_pairs} pairs, {self.mode}, {setting} at {self.reference_size[1]}x{self.reference_size[0]}, "
            f"queries {self.query_size[1]}x{self.query_size[0]}, keys {self.key_size[1]}x{self.key_size[0]})"
        )

    def at_size(self, query_size: tuple[int, int], key_size: tuple[int, int] | None = None) -> EpipolarMask:
        """The same masks for feature maps of another size (another UNet level)."""
        key_size = query_size if key_size is None else key_size
        _check_size("query_size", query_size)
        _check_size("key_size", key_size)
        return replace(self, query_size=tuple(query_size), key_size=tuple(key_size))

    def query_chunks(self, pairs_per_call: int | None = None, max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> list[slice]:
        """Slices of query rows whose dense masks for `pairs_per_call` pairs stay within about max_bytes to build."""
        return _row_chunks(self.num_queries, self.num_keys, self.num_pairs if pairs_per_call is None else pairs_per_call, max_bytes)

    def dense_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the dense masks of every pair take (`precomputed`): bool for hard masks, `dtype` for soft ones."""
        element = 1 if self.mode == "hard" else torch.empty(0, dtype=dtype).element_size()
        return self.num_pairs * self.num_queries * self.num_keys * element

    def precomputed(self, device=None, dtype: torch.dtype = torch.float32, max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> DenseEpipolarMask:
        """The dense masks of every pair, built once (a block of query rows at a time, so building never holds
        more than about max_bytes besides the result), for attention that runs many times over the same pairs."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        kind = torch.bool if self.mode == "hard" else dtype
        masks = torch.empty(self.num_pairs, self.num_queries, self.num_keys, dtype=kind, device=device)
        for rows in self.query_chunks(max_bytes=max_bytes):
            masks[:, rows] = self.dense(None, rows, device, dtype)
        return DenseEpipolarMask(masks, self.mode, self.query_size, self.key_size)

    def dense(
        self,
        pair_indices: Sequence[int] | torch.Tensor | None = None,
        query_slice: slice | torch.Tensor = slice(None),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(p, q, keys) masks of the chosen pairs for the chosen query rows (a slice, or a tensor of row indices),
        queries and keys flattened row-major (the `(h w)` order of einops). hard: bool, True = may attend. soft:
        additive bias in `dtype`. Only the chosen rows are built."""
        pair_indices = _pair_index_tensor(pair_indices, self.num_pairs)
        device = torch.device(device) if device is not None else torch.device("cpu")
        line_maps = self.line_maps[pair_indices].to(device, torch.float32)
        queries = _cell_centres(self.query_size, self.reference_size, device)[query_slice]
        keys = _cell_centres(self.key_size, self.reference_size, device)
        if self.mode == "hard":
            return _hard_mask(line_maps, queries, keys, _cell_half_size(self.query_size, self.reference_size),
                              _cell_half_size(self.key_size, self.reference_size), self.tau)
        lines = queries @ line_maps.transpose(1, 2)  # (p, q, 3): line of each query centre in the target view
        all_queries = _cell_centres(self.query_size, self.reference_size, device)
        band = self.band_fraction * _largest_centre_distance(all_queries @ line_maps.transpose(1, 2), self.key_size, self.reference_size)
        return _soft_bias(lines, keys, band, self.decay).to(dtype)

    def sdpa_mask(self, pair_indices=None, query_slice: slice = slice(None), device=None, dtype=torch.float32) -> torch.Tensor:
        """`dense` with a heads axis, (p, 1, q, keys), ready as `attn_mask` of scaled_dot_product_attention for
        queries (p, heads, q, d) and keys (p, heads, keys, d). A hard-mask row with no key inside (the epipolar line
        misses the target image) attends to nothing; PyTorch's SDPA returns zeros for such rows."""
        return self.dense(pair_indices, query_slice, device, dtype)[:, None]

    def density(self, pair_indices=None, max_bytes: int = DEFAULT_MAX_MASK_BYTES, max_queries: int | None = None) -> torch.Tensor:
        """(p,) fraction of (query, key) entries inside the mask (soft: with zero bias), built in chunks; over every
        query row, or over `max_queries` rows evenly spread over the map (an estimate at a bounded cost)."""
        pair_indices = _pair_index_tensor(pair_indices, self.num_pairs)
        rows = torch.arange(self.num_queries)
        if max_queries is not None and max_queries < self.num_queries:
            rows = torch.linspace(0, self.num_queries - 1, max(1, max_queries)).round().long().unique()
        inside = torch.zeros(len(pair_indices), dtype=torch.float64)
        per_chunk = max(1, max_bytes // (_BYTES_PER_ENTRY * len(pair_indices) * self.num_keys))
        for chunk in rows.split(per_chunk):
            built = self.dense(pair_indices, chunk)
            inside += (built if self.mode == "hard" else built == 0).flatten(1).sum(1).double()
        return inside / (len(rows) * self.num_keys)


@dataclass(frozen=True, eq=False)
class DenseEpipolarMask:
    """An EpipolarMask's masks held dense, (P, queries, keys): bool (hard) or an additive bias (soft). Attention
    over the same pairs many times (every layer and step of a sampling run) reads them instead of rebuilding them;
    `epipolar_attention` takes either form."""

    masks: torch.Tensor
    mode: MaskMode
    query_size: tuple[int, int]
    key_size: tuple[int, int]

    @property
    def num_pairs(self) -> int:
        return self.masks.shape[0]

    @property
    def num_queries(self) -> int:
        return self.masks.shape[1]

    @property
    def num_keys(self) -> int:
        return self.masks.shape[2]

    @property
    def nbytes(self) -> int:
        return self.masks.numel() * self.masks.element_size()

    def query_chunks(self, pairs_per_call: int | None = None, max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> list[slice]:
        return _row_chunks(self.num_queries, self.num_keys, self.num_pairs if pairs_per_call is None else pairs_per_call, max_bytes)

    def sdpa_mask(self, pair_indices=None, query_slice: slice = slice(None), device=None, dtype=torch.float32) -> torch.Tensor:
        pair_indices = _pair_index_tensor(pair_indices, self.num_pairs).to(self.masks.device)
        chunk = self.masks[pair_indices, query_slice]  # a copy of the chosen pairs' rows only
        chunk = chunk if self.mode == "hard" else chunk.to(dtype)
        return chunk[:, None].to(device) if device is not None else chunk[:, None]


def epipolar_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: EpipolarMask | DenseEpipolarMask,
    pair_indices: Sequence[int] | torch.Tensor | None = None,
    max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
) -> torch.Tensor:
    """Masked attention of source-view queries over target-view keys, never holding more than about
    max_mask_bytes of mask: the mask is built (or, for a DenseEpipolarMask, gathered) and used one block of query
    rows at a time.

    query (p, heads, Q, d) with Q = the mask's query cells; key, value (p, heads, K, d) with K = its key cells;
    pair p uses mask pair pair_indices[p] (default: all pairs in order). Returns (p, heads, Q, d_v). With a hard
    mask a query with no key inside gets a zero output, whatever the SDPA backend does with empty rows.
    """
    pair_indices = _pair_index_tensor(pair_indices, mask.num_pairs)
    expected_q = (len(pair_indices), mask.num_queries)
    if query.ndim != 4 or (query.shape[0], query.shape[2]) != expected_q or key.shape[2] != mask.num_keys:
        raise InvalidInput(
            "query", f"shapes {tuple(query.shape)} / {tuple(key.shape)} do not match {len(pair_indices)} pairs with "
            f"{mask.num_queries} query cells and {mask.num_keys} key cells", "rebuild the mask at this feature size (at_size)",
        )
    output = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    for rows in mask.query_chunks(len(pair_indices), max_mask_bytes):
        attn_mask = mask.sdpa_mask(pair_indices, rows, query.device, query.dtype)
        block = F.scaled_dot_product_attention(query[:, :, rows], key, value, attn_mask=attn_mask)
        if mask.mode == "hard":
            block = block.masked_fill(~attn_mask.any(dim=-1, keepdim=True), 0)
        output[:, :, rows] = block
    return output


def all_ordered_pairs(num_views: int) -> list[tuple[int, int]]:
    return [(source, target) for source in range(num_views) for target in range(num_views) if source != target]


def build_epipolar_mask(
    cameras: CameraRig,
    query_size: tuple[int, int],
    key_size: tuple[int, int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    mode: MaskMode = "hard",
    tau: float = 3.0,
    band_fraction: float = CVD_BAND_FRACTION,
    decay: float = CVD_DECAY,
    reference_size: tuple[int, int] | None = None,
    seed: int = 0,
    homographies: Mapping[tuple[int, int], torch.Tensor] | None = None,
    baseline_tolerance: float = 1e-6,
) -> EpipolarMask:
    """Epipolar masks for ordered (source, target) view pairs of one rig; default: all ordered pairs.

    reference_size: (height, width) in pixels where tau is measured; default the cameras' image size.
    homographies: {(source, target): H} for pairs related by a homography of reference pixels (pseudo-epipolar).
    A pair whose centres are closer than baseline_tolerance x the rig's scale has no epipolar geometry and gets a
    pseudo-epipolar mask. seed fixes the pseudo lines' slopes.
    """
    if len(cameras) < 2 and pairs is None:
        raise InvalidInput("cameras", f"an epipolar mask needs at least 2 views, got {len(cameras)}",
                           "pass a rig with 2 or more cameras")
    count = len(cameras) * (len(cameras) - 1) if pairs is None else len(pairs)
    check_memory("cameras", BUILD_BYTES_PER_PAIR * count, f"the masks of {count} ordered pairs of views ({len(cameras)} views)",
                 "use fewer views: every ordered pair of views gets a mask (e.g. lower max_frames or raise frame_stride "
                 "in MV4D Load Camera Trajectory)")
    pairs = all_ordered_pairs(len(cameras)) if pairs is None else [tuple(map(int, pair)) for pair in pairs]
    if not pairs:
        raise InvalidInput("pairs", "no view pairs given", "pass at least one (source, target) pair")
    bad = [pair for pair in pairs if not all(0 <= view < len(cameras) for view in pair)]
    if bad:
        raise InvalidInput("pairs", f"{bad[0]} names a view outside 0..{len(cameras) - 1}", "use view indices of the rig")
    key_size = query_size if key_size is None else key_size
    reference_size = (cameras.height, cameras.width) if reference_size is None else reference_size
    _check_size("query_size", query_size)
    _check_size("key_size", key_size)
    _check_size("reference_size", reference_size)
    _check_mask_settings(mode, tau, band_fraction, decay)

    rig = cameras.resized(*reference_size)
    sources = torch.tensor([pair[0] for pair in pairs])
    targets = torch.tensor([pair[1] for pair in pairs])
    line_maps = rig.fundamental_matrices(sources, targets)

    scale = max(1.0, float(rig.centers.norm(dim=-1).max()))
    no_baseline = (rig.centers[sources] - rig.centers[targets]).norm(dim=-1) <= baseline_tolerance * scale
    given = torch.zeros(len(pairs), dtype=torch.bool)
    point_maps = rig.intrinsics[targets] @ (rig.rotations[targets] @ rig.rotations[sources].transpose(1, 2)) @ torch.linalg.inv(rig.intrinsics[sources])
    for pair, homography in (homographies or {}).items():
        index = pairs.index(tuple(pair)) if tuple(pair) in pairs else None
        if index is None:
            raise InvalidInput("homographies", f"pair {tuple(pair)} is not among the mask's pairs", "give homographies only for listed pairs")
        point_maps[index] = _checked_homography(homography, pair)
        given[index] = True
    pseudo = no_baseline | given
    if pseudo.any():
        generator = torch.Generator().manual_seed(int(seed))
        slopes = torch.rand(len(pairs), generator=generator, dtype=GEOMETRY_DTYPE) * math.pi
        directions = torch.stack([-torch.sin(slopes), torch.cos(slopes), torch.zeros_like(slopes)], dim=-1)
        pseudo_maps = cross_product_matrix(directions) @ point_maps
        line_maps = torch.where(pseudo[:, None, None], pseudo_maps, line_maps)
    line_maps = line_maps / line_maps.flatten(1).norm(dim=1)[:, None, None]
    return EpipolarMask(
        line_maps=line_maps, pairs=torch.stack([sources, targets], dim=1), pseudo=pseudo,
        query_size=tuple(query_size), key_size=tuple(key_size), reference_size=tuple(reference_size),
        mode=mode, tau=float(tau), band_fraction=float(band_fraction), decay=float(decay),
    )


def reference_size_for(cameras: CameraRig, long_side: int) -> tuple[int, int]:
    """(height, width) with the rig's aspect ratio and the given long side (CVD measures at 256 px)."""
    if long_side <= 0:
        raise InvalidInput("reference_resolution", f"must be positive, got {long_side}", "use 256 (CVD) or the image size")
    scale = long_side / max(cameras.height, cameras.width)
    return max(1, round(cameras.height * scale)), max(1, round(cameras.width * scale))


def _row_chunks(queries: int, keys: int, pairs: int, max_bytes: int) -> list[slice]:
    rows = max(1, max_bytes // (_BYTES_PER_ENTRY * max(1, pairs) * keys))
    return [slice(start, min(start + rows, queries)) for start in range(0, queries, rows)]


def _check_size(name: str, size) -> None:
    if len(size) != 2 or any(int(side) != side or side <= 0 for side in size):
        raise InvalidInput(name, f"must be a positive (height, width), got {tuple(size)}", "pass positive whole sizes")


def _check_mask_settings(mode, tau, band_fraction, decay) -> None:
    if mode not in ("hard", "soft"):
        raise InvalidInput("mode", f"must be 'hard' or 'soft', got {mode!r}", "choose hard (paper) or soft (CVD code)")
    if not (tau >= 0 and math.isfinite(tau)):
        raise InvalidInput("tau", f"must be a distance >= 0 pixels, got {tau}", "use 3 (the paper's value)")
    if not 0 < band_fraction <= 1:
        raise InvalidInput("band_fraction", f"must lie in (0, 1], got {band_fraction}", "use 3/128 = 0.0234 (CVD)")
    if not (decay > 0 and math.isfinite(decay)):
        raise InvalidInput("decay", f"must be positive, got {decay}", "use 3 (CVD)")


def _checked_homography(homography, pair) -> torch.Tensor:
    homography = torch.as_tensor(homography, dtype=GEOMETRY_DTYPE)
    if homography.shape != (3, 3) or not torch.isfinite(homography).all() or abs(float(torch.linalg.det(homography))) < 1e-12:
        raise InvalidInput("homographies", f"the homography of pair {tuple(pair)} is not a finite invertible 3x3 matrix",
                           "pass a 3x3 homography between reference-resolution pixels")
    return homography


def _pair_index_tensor(pair_indices, num_pairs: int) -> torch.Tensor:
    if pair_indices is None:
        return torch.arange(num_pairs)
    pair_indices = torch.as_tensor(pair_indices, dtype=torch.long).reshape(-1)
    if len(pair_indices) == 0 or (pair_indices < 0).any() or (pair_indices >= num_pairs).any():
        raise InvalidInput("pair_indices", f"must be indices in 0..{num_pairs - 1}, got {pair_indices.tolist()}",
                           "pick pairs of this mask")
    return pair_indices


def _cell_centres(size: tuple[int, int], reference: tuple[int, int], device) -> torch.Tensor:
    """(h*w, 3) homogeneous reference-pixel centres of a feature map's cells, row-major."""
    height, width = size
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (reference[0] / height)
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (reference[1] / width)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_cols, grid_rows, torch.ones_like(grid_rows)], dim=-1).reshape(-1, 3)


def _cell_half_size(size: tuple[int, int], reference: tuple[int, int]) -> tuple[float, float]:
    """(x, y) half extent of one cell in reference pixels."""
    return reference[1] / size[1] / 2, reference[0] / size[0] / 2


def _pencil_bounds(line_maps, queries, query_half) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epipolar lines of all points of each query cell form a pencil through the target epipole, an interval
    of lines spanned by the lines of two of the cell's corners. Returns those two bounding lines (p, q, 3), oriented
    as L x with x = (u, v, 1), and (p, q) True where the cell holds the source epipole, whose pencil is every line."""
    qx, qy = query_half
    offsets = torch.tensor([[-qx, -qy, 0.0], [qx, -qy, 0.0], [-qx, qy, 0.0], [qx, qy, 0.0]], device=queries.device)
    corner_lines = torch.einsum("pij,qcj->pqci", line_maps, queries[:, None, :] + offsets)  # (p, q, 4, 3)
    centre_lines = torch.einsum("pij,qj->pqi", line_maps, queries)  # (p, q, 3)
    # All lines L x are orthogonal to the target epipole e (e^T L = 0): signed angles about e order the pencil.
    epipole = torch.linalg.svd(line_maps.double())[0][..., 2].to(line_maps.dtype)  # (p, 3)
    sine = torch.einsum("pqi,pi->pq", torch.cross(centre_lines[:, :, None, :].expand_as(corner_lines), corner_lines, dim=-1).flatten(1, 2), epipole)
    cosine = (centre_lines[:, :, None, :] * corner_lines).sum(-1).flatten(1)
    angle = torch.atan2(sine, cosine).reshape(corner_lines.shape[:3])  # relative to the centre's line, (p, q, 4)
    low, high = angle.min(dim=-1), angle.max(dim=-1)
    every_line = (
        (high.values - low.values >= math.pi - 1e-4)
        | (centre_lines.norm(dim=-1) < 1e-12)
        | (corner_lines.norm(dim=-1) < 1e-12).any(dim=-1)
    )
    first = corner_lines.gather(2, low.indices[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    second = corner_lines.gather(2, high.indices[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    return first, second, every_line


def _hard_mask(line_maps, queries, keys, query_half, key_half, tau) -> torch.Tensor:
    """Inside when some point of the key cell lies within tau of the epipolar line of some point of the query cell.

    Exact: the union of those lines is the double wedge between the two bounding lines of the pencil (the whole
    plane when the query cell holds the epipole). A key cell meets the wedge widened by tau when its centre lies in
    the wedge (the two bounding lines leave it on opposite sides), or when its box is within tau of either bounding
    line; the distance from a box to a line is exact from its centre and half sizes.
    """
    first, second, every_line = _pencil_bounds(line_maps, queries, query_half)
    kx, ky = key_half
    inside = every_line[..., None].expand(-1, -1, len(keys)).clone()
    side_first, side_second = first @ keys.T, second @ keys.T  # (p, q, k) signed, unnormalised
    inside |= (side_first * side_second) <= 0
    for line, side in ((first, side_first), (second, side_second)):
        reach = line[..., 0:1].abs() * kx + line[..., 1:2].abs() * ky + tau * line[..., :2].norm(dim=-1, keepdim=True)
        inside |= side.abs() <= reach
    return inside


def _normalised(lines: torch.Tensor) -> torch.Tensor:
    norm = lines[..., :2].norm(dim=-1, keepdim=True)
    # A query at the epipole has no line (L x = 0): distance 0 to every key, as CVD's +1e-6 guard gives.
    return torch.where(norm > 1e-12, lines / norm.clamp_min(1e-12), torch.zeros_like(lines))


def _largest_centre_distance(lines: torch.Tensor, key_size, reference) -> torch.Tensor:
    """(p, 1, 1) largest distance between any query line and any key centre: a point-line distance is affine in
    the point, so over the grid of key centres its maximum sits at one of the four corner cells."""
    height, width = key_size
    x0, x1 = 0.5 * reference[1] / width, (width - 0.5) * reference[1] / width
    y0, y1 = 0.5 * reference[0] / height, (height - 0.5) * reference[0] / height
    corners = torch.tensor([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], device=lines.device, dtype=lines.dtype)
    return (_normalised(lines) @ corners.T).abs().flatten(1).amax(dim=1)[:, None, None]


def _soft_bias(lines, keys, band, decay) -> torch.Tensor:
    distance = (_normalised(lines) @ keys.T).abs()
    band = band.clamp_min(1e-6)
    return -(distance - band).clamp_min(0) * (decay / band)
