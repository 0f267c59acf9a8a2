"""The pack's own ComfyUI socket types. Values are plain kernel objects, so any node or script can use them."""

from comfy_api.latest import io

# kernels.cameras.CameraRig: OpenCV world-to-camera extrinsics, pixel intrinsics, image size.
Cameras = io.Custom("MV4D_CAMERAS")
# kernels.epipolar.EpipolarMask: compact per-pair epipolar masks, evaluated at any feature-map size.
EpipolarMaskSocket = io.Custom("MV4D_EPIPOLAR_MASK")
# kernels.multiview_video.MultiviewVideo: images (V, F, H, W, 3), cameras, frame times.
MultiviewVideoSocket = io.Custom("MV4D_MULTIVIEW_VIDEO")
# kernels.splats.model.Splats4D: dynamic Gaussians with their frame times and cameras.
Splats4DSocket = io.Custom("MV4D_SPLATS4D")
# nodes.composed_guider.GridConditioning: the grid shape and the per-row / per-column conditioning of both models.
GridConditioningSocket = io.Custom("MV4D_GRID_CONDITIONING")
# kernels.models.motion.MotionModel: AnimateDiff motion modules (any released layout, normalised), with their version.
MotionModuleSocket = io.Custom("MV4D_MOTION_MODULE")
# integration.patches.camera_control.CameraControl: CameraCtrl's pose encoder and qkv_merge layers.
CameraCtrlSocket = io.Custom("MV4D_CAMERACTRL")
# kernels.models.alignment.AlignmentAdapters: Vivid-ZOO's alignment layers, with what they were made for.
AlignmentAdaptersSocket = io.Custom("MV4D_ALIGNMENT_ADAPTERS")
# kernels.models.cvd.CVDModel: CVD's cross-video synchronisation modules.
CVDModuleSocket = io.Custom("MV4D_CVD_MODULE")
