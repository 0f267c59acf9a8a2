"""CVD on a motion-patched MODEL: M camera-controlled videos of one scene, sampled together in one batch, that
agree through the synchronisation modules (kernels/models/cvd.py).

- CameraCtrl with every video's trajectory (patches/camera_control.py: M x F cameras, video by video, each video
  relative to its own first camera, as CameraCtrl was trained);
- the synchronisation modules hang on the down / up motion modules as their `after` while injected
  (with_motion_additions) and ride along as an additional model, so ComfyUI loads and offloads them;
- the grid (M videos x F frames) goes into the model's transformer_options, not into the conditioning: the MODEL
  and the LATENT that MV4D Apply CVD gives belong together, and the prompt stays plain core conditioning that any
  sampler takes (a grid the conditioning sets, from our multi-view nodes, would win; ApplyCVD's models have none);
- a DIFFUSION_MODEL wrapper gives every UNet call its pairing, drawn per sampling step from a seed (so cond and
  uncond calls of one step pair alike however ComfyUI splits them), and the masks; with `matchings` > 1 (and more
  than 2 videos) the UNet runs once per matching and the predictions are averaged, as CVD's accumulate_step;
- an OUTER_SAMPLE wrapper drops the dense masks kept during a sampling run when the run ends, so they hold no
  memory between prompts.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ...kernels.cameras import CameraRig
from ...kernels.grid import GRID_OPTION, Grid
from ...kernels.models.cvd import CrossVideoCall, CrossVideoMasks, CVDModel, CVDSettings, partners_for_step
from ..node_errors import input_error, kernel_errors_as_node_errors
from .camera_control import CameraControl, with_camera_control
from .conds import OPTIONS, call_data
from .motion import call_grid, with_motion_additions
from .shared import SharedPatch

CVD_KEY = "mv4d_cvd"
APPLY_NODE = "MV4D Apply CVD"
AFTER_PATH = "after"  # where a cross-video module hangs on a MotionModule


def sampling_step(transformer_options: dict) -> int:
    """Which step of the sampling run this call belongs to: the nearest of the run's sigmas (0 outside a run)."""
    sigmas, current = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
    if sigmas is None or current is None:
        return 0
    return int((sigmas.detach().flatten().float().cpu() - float(current.flatten()[0])).abs().argmin())


class CrossVideoPairing(SharedPatch):
    """DIFFUSION_MODEL wrapper: this call's pairing(s) and masks for the synchronisation modules."""

    def __init__(self, masks: CrossVideoMasks, settings: CVDSettings):
        self.masks, self.settings = masks, settings

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        grid, expected = call_grid(transformer_options, x.shape[0]), self.masks.grid
        chunks = len(transformer_options.get("cond_or_uncond", [0]))  # whole latents in this call (cond, uncond)
        if (grid.views, grid.frames) != (expected.views, expected.frames) or x.shape[0] != chunks * expected.cells:
            raise input_error(APPLY_NODE, "latent", f"the sampled latent has {x.shape[0] / chunks:g} items, but the trajectories "
                              f"give {expected.views} videos x {expected.frames} frames ({expected.cells})",
                              "sample the latent output of the same MV4D Apply CVD node (core context windows do not apply)")
        step = sampling_step(transformer_options)
        draws = 1 if grid.views == 2 else max(1, self.settings.matchings)  # two videos have one pairing only
        total = None
        for draw in range(draws):
            partners = partners_for_step(grid.views, self.settings.seed, step, draw)
            data = {**call_data(transformer_options), "cross_video": CrossVideoCall(partners, self.masks)}
            out = executor(x, timesteps, context, y, control, {**transformer_options, OPTIONS: data}, **kwargs)
            total = out if total is None else total + out
        return total if draws == 1 else total / draws


class ReleaseMasks(SharedPatch):
    """OUTER_SAMPLE wrapper: the dense masks live for one sampling run."""

    def __init__(self, masks: CrossVideoMasks):
        self.masks = masks

    def __call__(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            self.masks.clear()


def with_cvd(model, cvd: CVDModel, control: CameraControl, cameras: CameraRig, grid: Grid, settings: CVDSettings | None = None):
    """A clone of a motion-patched MODEL (without CameraCtrl) that samples grid.views videos of grid.frames frames
    together: cameras has one camera per frame of every video, video by video, in one world frame."""
    settings = settings or CVDSettings()
    with kernel_errors_as_node_errors(APPLY_NODE):
        masks = CrossVideoMasks.for_settings(cameras, grid, settings)
    patched = model.clone()
    # registered before CameraCtrl's wrapper, so it runs outside it: the latent is checked before anything uses it
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CVD_KEY, CrossVideoPairing(masks, settings))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CVD_KEY, ReleaseMasks(masks))
    patched.model_options.setdefault("transformer_options", {})[GRID_OPTION] = grid
    patched = with_camera_control(patched, control, cameras, settings.camera_scale)
    patched = with_motion_additions(patched, {name: {AFTER_PATH: module} for name, module in cvd.by_motion_module().items()})
    patched.set_additional_models(CVD_KEY, [comfy.model_patcher.ModelPatcher(
        cvd, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device())])
    return patched


def has_cvd(model) -> bool:
    return bool(getattr(model, "additional_models", {}).get(CVD_KEY))


def masks_of(model) -> CrossVideoMasks | None:
    """The masks a CVD MODEL uses (for tests and benchmarks)."""
    for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CVD_KEY):
        return wrapper.masks
    return None


def joined_trajectories(trajectories: list[CameraRig]) -> CameraRig:
    """One rig of every video's cameras, video by video."""
    first = trajectories[0]
    return CameraRig(torch.cat([rig.world_to_camera for rig in trajectories]), torch.cat([rig.intrinsics for rig in trajectories]),
                     first.height, first.width)
