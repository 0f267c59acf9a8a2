"""4Diffusion nodes: load 4DM (ImageDream + motion modules), condition it on a monocular video (video -> multi-view
video with core samplers), and refine 4D Gaussians with its 4D-aware score distillation and the anchor loss."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..integration import host
from ..integration.fourdm_models import load_4dm
from ..integration.motion_models import motion_files
from ..integration.multiview_conditioning import fourdm_conditioning, fourdm_rig
from ..integration.multiview_models import resolve_checkpoint
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from ..integration.score_distillation import REFINE, refine_with_sds
from ..kernels.models.fourdm import BASE_FILE, FILE, TRAINED_FRAMES, TRAINED_VIEWS
from ..kernels.score_distillation import SDSSettings
from ..kernels.splats.losses import load_lpips
from .motion import checked_file
from .splats import BACKGROUNDS, lpips_weights, splat_outputs, with_splats
from .types import Cameras, Splats4DSocket

LOAD = "MV4D Load 4DM"
CONDITIONING = "MV4D 4DM Conditioning"
SDS = SDSSettings()


class Load4DM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        host.register_model_folders()
        return io.Schema(
            node_id="MV4D_Load4DM",
            display_name=LOAD,
            category="mv4d/4diffusion",
            description="Loads 4Diffusion's multi-view video model 4DM: its base, ImageDream (models/checkpoints), with the "
                        f"motion modules of {FILE} (models/animatediff_models; any UNet weights the file holds replace the "
                        "base's). The MODEL is ImageDream's (stock SD2.1 + our multi-view patches) with the motion modules "
                        "injected, ImageDream's noise schedule kept. Condition it with MV4D 4DM Conditioning.",
            inputs=[
                io.Combo.Input("fourdm", options=motion_files(), tooltip=f"4Diffusion's {FILE} in models/animatediff_models."),
                io.Combo.Input("base_ckpt", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip=f"ImageDream's {BASE_FILE} in models/checkpoints: 4DM's base (UNet, VAE, encoders)."),
            ],
            outputs=[
                io.Model.Output("model", tooltip="4DM: the multi-view video UNet (eps, ImageDream's schedule)."),
                io.Clip.Output("clip", tooltip="The base's text encoder (None when its file has none: the node's text says what to load)."),
                io.Vae.Output("vae", tooltip="The base's VAE (None when its file has none)."),
                io.ClipVision.Output("clip_vision", tooltip="The base's OpenCLIP ViT-H/14 image encoder (None when its file has none)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, fourdm, base_ckpt):
        if resolve_checkpoint(base_ckpt) is None:
            return f"{LOAD}: input 'base_ckpt': {base_ckpt!r} is not in models/checkpoints. Fix: put {BASE_FILE} there and refresh (R)"
        return True

    @classmethod
    def execute(cls, fourdm, base_ckpt) -> io.NodeOutput:
        path = checked_file(LOAD, "fourdm", fourdm)
        with kernel_errors_as_node_errors(LOAD):
            result = load_4dm(path, resolve_checkpoint(base_ckpt), folder_paths.get_folder_paths("embeddings"))
        loaded = result.loaded
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae, loaded.clip_vision, ui=ui.PreviewText(result.summary()))


class FourDMConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_4DMConditioning",
            display_name=CONDITIONING,
            category="mv4d/4diffusion",
            description="Monocular video + text + cameras -> what KSampler needs for 4DM: `frames` frames of the video, each "
                        "the image prompt (CLIP vision through ImageDream's resampler) and the pixel controller's clean "
                        "latent of its frame, over the views of the cameras: a (views + 1) x frames latent grid. Sample with "
                        "any core sampler (4Diffusion: DDIM, CFG 5); MV4D Decode Grid drops the controller view.",
            inputs=[
                io.Model.Input("model", tooltip="From MV4D Load 4DM."),
                io.ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-H/14 (MV4D Load 4DM's, or core Load CLIP Vision)."),
                io.Vae.Input("vae", tooltip="The base's VAE (for the pixel controller)."),
                io.Image.Input("video", tooltip="The monocular video's frames (core LoadVideo -> Get Video Components): the object "
                                                "centred, ideally on white; each frame resized (centre crop) to the cameras' size."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the object (may be short)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                Cameras.Input("cameras", optional=True, tooltip="The views (multiple of 4; view 0 is the video's). Default: "
                                                                "4DM's official 4 views at elevation 0."),
                io.Int.Input("views", default=TRAINED_VIEWS, min=4, max=64, step=4, tooltip="Views of the default rig (4DM: 4)."),
                io.Int.Input("width", default=256, min=64, max=2048, step=8, tooltip="Image width of the default rig (4DM: 256)."),
                io.Int.Input("height", default=256, min=64, max=2048, step=8, tooltip="Image height of the default rig."),
                io.Int.Input("frames", default=TRAINED_FRAMES, min=1, max=4096,
                             tooltip=f"Frames of the multi-view video (4DM was trained on {TRAINED_FRAMES}; its motion modules' "
                                     "position table holds 32)."),
                io.Int.Input("frame_stride", default=1, min=1, max=1000, tooltip="Take every n-th frame of the video, from its first."),
                io.Float.Input("image_prompt_weight", default=1.0, min=0.0, max=5.0, step=0.05, tooltip="Weight of the image-prompt attention (official: 1)."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive", tooltip="The prompt with each cell's image prompt and camera."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="The unconditional counterpart (zero images)."),
                io.Latent.Output("latent", tooltip="An empty (views + 1) x frames grid latent, view-major."),
                Cameras.Output("cameras_out", display_name="cameras", tooltip="The cameras of the generated views."),
                io.Image.Output("frames_out", display_name="frames", tooltip="The video frames used, at the cameras' size (the SDS anchor)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, video, positive, negative, views, width, height, frames, frame_stride,
                image_prompt_weight, cameras=None) -> io.NodeOutput:
        check_numbers(CONDITIONING, locals())
        for name, value in (("clip_vision", clip_vision), ("vae", vae)):
            if value is None:
                raise input_error(CONDITIONING, name, "nothing is connected (the base file has none)",
                                  "connect core Load CLIP Vision (ViT-H/14)" if name == "clip_vision" else "connect core Load VAE")
        if cameras is None:
            with kernel_errors_as_node_errors(CONDITIONING):
                cameras = fourdm_rig(views, height, width)
        positive, negative, latent, pictures = fourdm_conditioning(CONDITIONING, model, clip_vision, vae, video, positive, negative,
                                                                   cameras, frames, frame_stride, image_prompt_weight)
        return io.NodeOutput(positive, negative, latent, cameras, pictures)


class Refine4DWithSDS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Refine4DWithSDS",
            display_name=REFINE,
            category="mv4d/4diffusion",
            description="4Diffusion's 4D-aware score distillation: refines 4D Gaussians (e.g. fitted to 4DM's multi-view video) "
                        "with 4DM's guided score on their renders at random turns of the cameras and random windows of "
                        "frames (x0-reconstruction SDS), plus the anchor loss of the anchor view's render to the video. Only "
                        "the renders carry gradients (the UNet runs without, in ComfyUI's dtype). Cancel stops it at the next "
                        "iteration.",
            inputs=[
                Splats4DSocket.Input("splats_4d", tooltip="The 4D Gaussians to refine (MV4D Fit 4D Gaussians on the decoded 4DM video)."),
                io.Model.Input("model", tooltip="4DM, from MV4D Load 4DM."),
                io.Conditioning.Input("positive", tooltip="MV4D 4DM Conditioning's positive."),
                io.Conditioning.Input("negative", tooltip="MV4D 4DM Conditioning's negative."),
                io.Vae.Input("vae", tooltip="The base's VAE (encodes the renders, with gradients)."),
                Cameras.Input("cameras", tooltip="MV4D 4DM Conditioning's cameras (the views SDS renders, turned at random)."),
                io.Image.Input("anchor_video", tooltip="The anchor frames: MV4D 4DM Conditioning's frames (the input video), seen from anchor_view."),
                io.Int.Input("iterations", default=SDS.iterations, min=1, max=100000, tooltip="Optimisation steps (each: one 4DM call with CFG)."),
                io.Float.Input("guidance_scale", default=SDS.guidance_scale, min=0.0, max=100.0, step=0.5, tooltip="CFG scale of the score (4Diffusion: 5)."),
                io.Float.Input("timestep_min", default=SDS.timestep_min, min=0.0, max=1.0, step=0.01, tooltip="Lowest noise level drawn (fraction of the schedule)."),
                io.Float.Input("timestep_max", default=SDS.timestep_max, min=0.0, max=1.0, step=0.01,
                               tooltip="Highest noise level drawn (4Diffusion anneals 0.98 -> 0.25 from scratch; a refinement stays low)."),
                io.Int.Input("window_frames", default=SDS.window_frames, min=1, max=32, tooltip="Frames per SDS evaluation (4DM: 8)."),
                io.Int.Input("anchor_view", default=0, min=0, max=63, tooltip="The view the video was filmed from (4DM's default rig: 0)."),
                io.Float.Input("anchor_ssim_weight", default=SDS.anchor_ssim_weight, min=0.0, max=10000.0, step=1.0, tooltip="Weight of the anchor's 1 - SSIM (4Diffusion: 100)."),
                io.Float.Input("anchor_lpips_weight", default=SDS.anchor_lpips_weight, min=0.0, max=10000.0, step=1.0,
                               tooltip="Weight of the anchor's LPIPS (4Diffusion: 200); needs vgg16 and LPIPS vgg.pth in ComfyUI/models/lpips."),
                io.Float.Input("sds_weight", default=SDS.sds_weight, min=0.0, max=100.0, step=0.1, tooltip="Weight of the SDS term (4Diffusion: 1)."),
                io.Float.Input("x0_rescale", default=SDS.x0_rescale, min=0.0, max=1.0, step=0.05,
                               tooltip="Rescale of x0 toward the conditional prediction's spread (4Diffusion: 0.2; 0 = plain SDS)."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white", tooltip="Colour behind the Gaussians (4DM's views: white)."),
                io.Int.Input("seed", default=SDS.seed, min=0, max=2**31 - 1, tooltip="Seed of timesteps, noise, turns and frame windows."),
            ],
            outputs=[Splats4DSocket.Output("splats_4d_out", display_name="splats_4d", tooltip="The refined 4D Gaussians."), *splat_outputs()],
        )

    @classmethod
    def execute(cls, splats_4d, model, positive, negative, vae, cameras, anchor_video, iterations, guidance_scale, timestep_min,
                timestep_max, window_frames, anchor_view, anchor_ssim_weight, anchor_lpips_weight, sds_weight, x0_rescale,
                background, seed) -> io.NodeOutput:
        check_numbers(REFINE, locals())
        if vae is None:
            raise input_error(REFINE, "vae", "nothing is connected (the base file has none)", "connect core Load VAE")
        lpips = None
        if anchor_lpips_weight > 0:
            files = lpips_weights()
            if files is None:
                raise input_error(REFINE, "anchor_lpips_weight", "LPIPS needs weights that no package ships",
                                  "put torchvision's vgg16-397923af.pth and LPIPS' v0.1 vgg.pth into ComfyUI/models/lpips, or set it to 0")
            with kernel_errors_as_node_errors(REFINE, {"lpips": "anchor_lpips_weight"}):
                lpips = load_lpips(*files)
        settings = SDSSettings(iterations, guidance_scale, timestep_min, timestep_max, window_frames, x0_rescale, sds_weight,
                               anchor_ssim_weight, anchor_lpips_weight, seed)
        result = refine_with_sds(splats_4d, model, vae, positive, negative, cameras, anchor_video, anchor_view, settings,
                                 BACKGROUNDS[background], lpips)
        sds, anchor = result.history.means("sds", 5), result.history.means("anchor", 5)
        text = (f"{iterations} iterations in {result.seconds:.1f} s. SDS objective per fifth: {', '.join(f'{v:.4g}' for v in sds) or 'off'}; "
                f"anchor loss: {', '.join(f'{v:.4g}' for v in anchor)}")
        return io.NodeOutput(*with_splats(REFINE, result.scene), ui=ui.PreviewText(text))
