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
