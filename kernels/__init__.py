"""Everything that computes, in plain PyTorch (with einops, kornia, gsplat). Never imports ComfyUI.

Modules are imported one by one (`from mv4d.kernels.cameras import CameraRig`) so that importing the pack
stays cheap.
"""
