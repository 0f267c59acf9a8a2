"""Epipolar-mask nodes: build CVD's masks for every ordered pair of a rig, and show one pair as a picture."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..kernels.epipolar import CVD_BAND_FRACTION, CVD_DECAY, CVD_REFERENCE_PIXELS, build_epipolar_mask, reference_size_for
from ..kernels.epipolar_preview import pair_density, pick_query_cells, render_mask_preview
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from .types import Cameras, EpipolarMaskSocket

MASK_NODE = "MV4D Epipolar Mask"
PREVIEW_NODE = "MV4D Preview Epipolar Mask"


class EpipolarMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_EpipolarMask",
            display_name=MASK_NODE,
            category="mv4d/epipolar",
            description=(
                "CVD's epipolar attention masks for all ordered pairs of views of a camera rig, at a latent size. "
                "hard: key cells within tau pixels of the query's epipolar line (the paper). soft: CVD code's "
                "additive bias. Pairs with no baseline get CVD's pseudo-epipolar line of random slope."
            ),
            inputs=[
                Cameras.Input("cameras", tooltip="The views; at least 2."),
                io.Int.Input("latent_width", default=32, min=1, max=1024, tooltip="Feature-map width the mask is for (image width / 8 for SD latents)."),
                io.Int.Input("latent_height", default=32, min=1, max=1024, tooltip="Feature-map height the mask is for."),
                io.Combo.Input("mode", options=["hard", "soft"], default="hard",
                               tooltip="hard: attend only near the epipolar line (paper). soft: CVD code's distance bias (for CVD's weights)."),
                io.Float.Input("tau", default=3.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="hard: band half-width in pixels at the reference resolution (paper: 3)."),
                io.Int.Input("reference_resolution", default=CVD_REFERENCE_PIXELS, min=0, max=8192,
                             tooltip="Long side, in pixels, of the image grid tau is measured on (CVD: 256). 0 = the cameras' image size."),
                io.Float.Input("band_fraction", default=round(CVD_BAND_FRACTION, 4), min=0.0001, max=1.0, step=0.0001,
                               tooltip="soft: band as a fraction of the largest line distance (CVD: 3/128 = 0.0234)."),
                io.Float.Input("decay", default=CVD_DECAY, min=0.01, max=100.0, step=0.01, tooltip="soft: steepness of the bias outside the band (CVD: 3)."),
                io.Int.Input("slope_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the pseudo-epipolar line slopes (pairs with no baseline)."),
            ],
            outputs=[EpipolarMaskSocket.Output("epipolar_mask", tooltip="Masks of all ordered view pairs, in compact form.")],
        )

    @classmethod
    def execute(cls, cameras, latent_width, latent_height, mode, tau, reference_resolution, band_fraction, decay, slope_seed) -> io.NodeOutput:
        check_numbers(MASK_NODE, locals())
        with kernel_errors_as_node_errors(MASK_NODE, {"query_size": "latent_width/latent_height", "key_size": "latent_width/latent_height"}):
            reference = None if reference_resolution == 0 else reference_size_for(cameras, reference_resolution)
            mask = build_epipolar_mask(
                cameras, (latent_height, latent_width), mode=mode, tau=tau, band_fraction=band_fraction,
                decay=decay, reference_size=reference, seed=slope_seed,
            )
        return io.NodeOutput(mask)


class PreviewEpipolarMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_PreviewEpipolarMask",
            display_name=PREVIEW_NODE,
            category="mv4d/epipolar",
            description=(
                "Shows a few query cells in one view (left) and their epipolar masks over another view (right), "
                "each in its own colour with the exact epipolar line drawn, so you can check the mask follows the cameras."
            ),
            is_output_node=True,
            inputs=[
                EpipolarMaskSocket.Input("epipolar_mask", tooltip="Masks from MV4D Epipolar Mask."),
                io.Int.Input("source_view", default=0, min=0, max=4095, tooltip="View whose cells ask (queries)."),
                io.Int.Input("target_view", default=1, min=0, max=4095, tooltip="View whose cells are masked (keys)."),
                io.Int.Input("queries", default=4, min=1, max=8, tooltip="How many query cells to show."),
                io.Int.Input("query_seed", default=0, min=0, max=2**31 - 1, tooltip="Which query cells are picked."),
                io.Int.Input("panel_height", default=256, min=64, max=2048, tooltip="Height of each view's panel in pixels."),
                io.Image.Input("images", optional=True, tooltip="Optional: one image per view, in view order, drawn under the masks."),
            ],
            outputs=[
                io.Image.Output("preview", tooltip="Source view with query cells | target view with their masks."),
                io.String.Output("summary", tooltip="Mask mode and density of this pair."),
            ],
        )

    @classmethod
    def execute(cls, epipolar_mask, source_view, target_view, queries, query_seed, panel_height, images=None) -> io.NodeOutput:
        pairs = epipolar_mask.pairs
        views = 1 + int(pairs.max())
        for name, view in (("source_view", source_view), ("target_view", target_view)):
            if view >= views:
                raise input_error(PREVIEW_NODE, name, f"view {view} does not exist in this {views}-view mask", f"pick a view in 0..{views - 1}")
        if source_view == target_view:
            raise input_error(PREVIEW_NODE, "target_view", "source_view equals target_view", f"pick two different views in 0..{views - 1}")
        found = ((pairs[:, 0] == source_view) & (pairs[:, 1] == target_view)).nonzero()
        if len(found) == 0:
            raise input_error(PREVIEW_NODE, "target_view", f"views {source_view} -> {target_view} are not a pair of this mask",
                              "pick a pair the mask was built for")
        pair_index = int(found[0, 0])
        source_image = target_image = None
        if images is not None:
            if images.shape[0] <= max(source_view, target_view):
                raise input_error(PREVIEW_NODE, "images", f"{images.shape[0]} images, but view {max(source_view, target_view)} was asked for",
                                  "connect one image per view, in view order, or leave images unconnected")
            source_image, target_image = images[source_view], images[target_view]
        with kernel_errors_as_node_errors(PREVIEW_NODE):
            cells = pick_query_cells(epipolar_mask, queries, query_seed)
            picture = render_mask_preview(epipolar_mask, pair_index, cells, source_image, target_image, panel_height)
        density, rows = pair_density(epipolar_mask, pair_index)
        kind = "pseudo-epipolar" if bool(epipolar_mask.pseudo[pair_index]) else "epipolar"
        over = "" if rows == epipolar_mask.num_queries else f", estimated from {rows} query rows spread over the map"
        summary = (
            f"views {source_view} -> {target_view}: {epipolar_mask.mode} {kind} mask, density {density:.2%} "
            f"({epipolar_mask.num_queries} query x {epipolar_mask.num_keys} key cells{over})"
        )
        picture = picture[None]  # IMAGE batch of one
        return io.NodeOutput(picture, summary, ui=ui.PreviewImage(picture, cls=cls))
