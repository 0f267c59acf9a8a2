"""MV4D_MULTIVIEW_VIDEO nodes: to and from plain IMAGE batches, and a synthetic example to try the 4D stages
without any model."""

from __future__ import annotations

from comfy_api.latest import io

from ..kernels.multiview_video import from_image_batch, to_image_batch
from ..kernels.synthetic_scene import example_multiview_video
from ..integration import host
from ..integration.node_errors import check_numbers, kernel_errors_as_node_errors
from .types import Cameras, MultiviewVideoSocket

IMAGES_TO_VIDEO = "MV4D Images To Multiview Video"
EXAMPLE_SCENE = "MV4D Example Scene"


class ImagesToMultiviewVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ImagesToMultiviewVideo",
            display_name=IMAGES_TO_VIDEO,
            category="mv4d/multiview video",
            description="Groups an IMAGE batch of views x frames (view-major: all frames of view 0, then view 1, ...) "
                        "with the views' cameras into a multi-view video.",
            inputs=[
                io.Image.Input("images", tooltip="views x frames images, view-major."),
                Cameras.Input("cameras", tooltip="One camera per view (or one per view and frame, view-major)."),
                io.Int.Input("frames", default=25, min=1, max=4096, tooltip="Frames per view."),
            ],
            outputs=[MultiviewVideoSocket.Output("multiview_video", tooltip="The views x frames matrix with its cameras.")],
        )

    @classmethod
    def execute(cls, images, cameras, frames) -> io.NodeOutput:
        with kernel_errors_as_node_errors(IMAGES_TO_VIDEO):
            return io.NodeOutput(from_image_batch(images, cameras, frames))


class MultiviewVideoToImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_MultiviewVideoToImages",
            display_name="MV4D Multiview Video To Images",
            category="mv4d/multiview video",
            description="Splits a multi-view video back into an IMAGE batch (view-major), its cameras and its frame count.",
            inputs=[MultiviewVideoSocket.Input("multiview_video", tooltip="A multi-view video.")],
            outputs=[
                io.Image.Output("images", tooltip="views x frames images, view-major."),
                Cameras.Output("cameras", tooltip="The cameras."),
                io.Int.Output("frames", tooltip="Frames per view."),
            ],
        )

    @classmethod
    def execute(cls, multiview_video) -> io.NodeOutput:
        return io.NodeOutput(to_image_batch(multiview_video), multiview_video.cameras, multiview_video.num_frames)


class ExampleScene(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ExampleScene",
            display_name=EXAMPLE_SCENE,
            category="mv4d/examples",
            description="A synthetic animated scene (a spinning checkered ball, a striped ellipsoid, a ringed plinth) "
                        "ray-cast from the given cameras, with small per-image perturbations like generated images "
                        "have. Ground truth to try the 4D Gaussian fit without any model. Cancel stops it at the next image.",
            inputs=[
                Cameras.Input("cameras", tooltip="The views, e.g. from MV4D Orbit Cameras (the scene sits at the origin, +Z up)."),
                io.Int.Input("frames", default=25, min=1, max=1000, tooltip="Frames per view over the clip."),
                io.Float.Input("perturbation", default=1.0, min=0.0, max=5.0, step=0.1,
                               tooltip="Strength of the per-image exposure, colour, shift and noise perturbations (0 = clean)."),
                io.Int.Input("perturbation_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the perturbations."),
            ],
            outputs=[MultiviewVideoSocket.Output("multiview_video", tooltip="The rendered views x frames.")],
        )

    @classmethod
    def execute(cls, cameras, frames, perturbation, perturbation_seed) -> io.NodeOutput:
        check_numbers(EXAMPLE_SCENE, locals())
        with kernel_errors_as_node_errors(EXAMPLE_SCENE, {"cameras": "cameras/frames"}):
            return io.NodeOutput(example_multiview_video(cameras, frames, perturbation_seed, perturbation, on_image=host.progress()))
