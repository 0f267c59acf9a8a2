"""Multi-view model nodes: load MVDream / ImageDream as native ComfyUI models, and condition them on cameras
(MVDream) or on an image and cameras (ImageDream) for core KSampler / SamplerCustomAdvanced."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..integration.multiview_conditioning import default_rig, imagedream_conditioning, multiview_conditioning
from ..integration.multiview_models import checkpoint_choices, load_multiview_model, resolve_checkpoint
from ..integration.node_errors import input_error, kernel_errors_as_node_errors
from ..integration.patches.multiview import multiview_family
from .types import Cameras

LOAD = "MV4D Load Multi-view Model"
MULTIVIEW_CONDITIONING = "MV4D Multi-view Conditioning"
IMAGEDREAM_CONDITIONING = "MV4D ImageDream Conditioning"
DEFAULT_VIEWS, DEFAULT_SIZE = 4, 256  # MVDream / ImageDream: 4 orthogonal views at 256 px


class LoadMultiviewModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadMultiviewModel",
            display_name=LOAD,
            category="mv4d/multi-view models",
            description="Loads MVDream (SD1.5 or SD2.1, 4 views) or ImageDream (SD2.1, image prompt) from models/checkpoints "
                        "(the original .pt / .safetensors; .pt and .ckpt are read as weights only) or a diffusers-format "
                        "folder from models/diffusers. The MODEL is a stock Stable Diffusion model (LoRA, ControlNet and core "
                        "samplers work) with the camera MLP, multi-view attention and image prompt added as patches.",
            inputs=[io.Combo.Input("ckpt_name", options=checkpoint_choices(),
                                   tooltip="sd-v1.5-4view.pt, sd-v2.1-base-4view.pt, sd-v2.1-base-4view-ipmv.pt, or a diffusers folder.")],
            outputs=[
                io.Model.Output("model", tooltip="The multi-view UNet (eps prediction)."),
                io.Clip.Output("clip", tooltip="Its text encoder (None when the file has none: the node's text says what to load)."),
                io.Vae.Output("vae", tooltip="Its VAE (None when the file has none)."),
                io.ClipVision.Output("clip_vision", tooltip="ImageDream's OpenCLIP ViT-H/14 image encoder (None for MVDream, or when the file has none)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        if resolve_checkpoint(ckpt_name) is None:
            return f"{LOAD}: input 'ckpt_name': {ckpt_name!r} is not in models/checkpoints or models/diffusers. Fix: put the file there and refresh (R)"
        return True

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        with kernel_errors_as_node_errors(LOAD):
            loaded = load_multiview_model(resolve_checkpoint(ckpt_name), folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae, loaded.clip_vision, ui=ui.PreviewText(loaded.summary()))


def camera_inputs() -> list:
    return [
        Cameras.Input("cameras", optional=True, tooltip="The views (e.g. MV4D Orbit Cameras). Default: the model's official 4 orthogonal views."),
        io.Int.Input("views", default=DEFAULT_VIEWS, min=1, max=64, tooltip="Views of the default orbit (when no cameras are connected)."),
        io.Int.Input("width", default=DEFAULT_SIZE, min=64, max=2048, step=8, tooltip="Image width of the default orbit (MVDream/ImageDream: 256)."),
        io.Int.Input("height", default=DEFAULT_SIZE, min=64, max=2048, step=8, tooltip="Image height of the default orbit."),
    ]


def rig_for(node: str, model, cameras, views: int, width: int, height: int):
    if cameras is not None:
        return cameras
    family = multiview_family(model)
    if family is None:
        return None  # refused with its message by the conditioning itself
    with kernel_errors_as_node_errors(node):
        return default_rig(family, views, height, width)


class MultiviewConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_MultiviewConditioning",
            display_name=MULTIVIEW_CONDITIONING,
            category="mv4d/multi-view models",
            description="Text + cameras -> what KSampler needs for MVDream: the prompt's conditioning with one camera per "
                        "latent item (MVDream's camera embedding) and an empty latent of one view per camera. Sample with any "
                        "core sampler (MVDream: CFG 7.5, 50 steps DDIM-like); decode with MV4D Decode Grid and these cameras.",
            inputs=[
                io.Model.Input("model", tooltip="From MV4D Load Multi-view Model."),
                io.Conditioning.Input("positive", tooltip="The prompt (CLIPTextEncode with the loader's CLIP)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                *camera_inputs(),
                io.Int.Input("frames", default=1, min=1, max=256, optional=True,
                             tooltip="Frames per view: more than 1 makes a multi-view video (apply a motion module to the model first)."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive", tooltip="The prompt with each latent item's camera."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="The negative prompt with the same cameras."),
                io.Latent.Output("latent", tooltip="One empty latent per view and frame (view-major)."),
                Cameras.Output("cameras_out", display_name="cameras", tooltip="The cameras used (for Decode Grid and the fit)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, views, width, height, cameras=None, frames=1) -> io.NodeOutput:
        rig = rig_for(MULTIVIEW_CONDITIONING, model, cameras, views, width, height)
        positive, negative, latent = multiview_conditioning(MULTIVIEW_CONDITIONING, model, positive, negative, rig, frames)
        return io.NodeOutput(positive, negative, latent, rig)


class ImageDreamConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ImageDreamConditioning",
            display_name=IMAGEDREAM_CONDITIONING,
            category="mv4d/multi-view models",
            description="Image + text + cameras -> what KSampler needs for ImageDream: the image prompt (CLIP vision hidden "
                        "states through ImageDream's resampler), per-view cameras and, with the pixel controller, an extra "
                        "last view that carries the image's clean latent (official 'pixel' mode; MV4D Decode Grid drops it).",
            inputs=[
                io.Model.Input("model", tooltip="ImageDream from MV4D Load Multi-view Model."),
                io.ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-H/14 (the loader's, or core Load CLIP Vision)."),
                io.Vae.Input("vae", tooltip="The model's VAE (for the pixel controller)."),
                io.Image.Input("image", tooltip="The object, ideally centred on a white background; resized (centre crop) to the cameras' size."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the image (may be short)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                *camera_inputs(),
                io.Float.Input("image_prompt_weight", default=1.0, min=0.0, max=5.0, step=0.05, tooltip="Weight of the image-prompt attention (official: 1)."),
                io.Boolean.Input("pixel_controller", default=True, tooltip="Add the clean-image view (official 'pixel' mode, 4 views + 1)."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive", tooltip="The prompt with the image prompt and cameras."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="The unconditional counterpart (zero image)."),
                io.Latent.Output("latent", tooltip="One empty latent per view (+ the controller view)."),
                Cameras.Output("cameras_out", display_name="cameras", tooltip="The cameras of the generated views."),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, image, positive, negative, views, width, height, image_prompt_weight,
                pixel_controller, cameras=None) -> io.NodeOutput:
        node = IMAGEDREAM_CONDITIONING
        for name, value in (("clip_vision", clip_vision), ("vae", vae)):
            if value is None:
                raise input_error(node, name, "nothing is connected (the loader's file has none)",
                                  "connect core Load CLIP Vision (ViT-H/14)" if name == "clip_vision" else "connect core Load VAE")
        rig = rig_for(node, model, cameras, views, width, height)
        positive, negative, latent = imagedream_conditioning(node, model, clip_vision, vae, image, positive, negative, rig,
                                                             image_prompt_weight, pixel_controller)
        return io.NodeOutput(positive, negative, latent, rig)
