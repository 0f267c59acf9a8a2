"""MV4D Preview 4D: the 4D Gaussians in an interactive player inside the node (web/mv4d_preview.js)."""

from __future__ import annotations

from comfy_api.latest import io

from ..integration.node_errors import kernel_errors_as_node_errors
from ..integration.previews import write_player_preview
from .splats import BACKGROUNDS
from .types import Splats4DSocket

PREVIEW = "MV4D Preview 4D"


class Preview4D(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Preview4D",
            display_name=PREVIEW,
            category="mv4d/4d gaussians",
            description=(
                "Shows 4D Gaussians in an interactive player inside the node: drag to orbit, right- or shift-drag to pan, "
                "wheel to zoom, play / pause, a time slider and frames per second, reset view. The player draws the "
                "scene as MV4D Render 4D does, in the browser (WebGL2); it starts at the scene's first camera. "
                "To look at a saved file, connect MV4D Load 4D."
            ),
            is_output_node=True,
            inputs=[
                Splats4DSocket.Input("splats_4d", tooltip="4D Gaussians from MV4D Fit 4D Gaussians or MV4D Load 4D."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white", tooltip="Colour behind the Gaussians."),
                io.Float.Input("fps", default=12.0, min=1.0, max=60.0, step=1.0, tooltip="Playback speed in frames per second (the player can change it)."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, splats_4d, background, fps) -> io.NodeOutput:
        with kernel_errors_as_node_errors(PREVIEW):
            entry = write_player_preview(splats_4d, BACKGROUNDS[background], fps)
        return io.NodeOutput(ui={"mv4d_player": [entry]})
