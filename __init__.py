"""mv4d: multi-view video and 4D Gaussian generation for ComfyUI, by composing pretrained video and multi-view
diffusion models (Diffusion², CVD, Vivid-ZOO, VideoMV, 4Diffusion).

Importing this package loads nothing heavy and never needs ComfyUI: the node classes are registered lazily in
`comfy_entrypoint`, which only ComfyUI calls. `kernels/` is plain PyTorch usable anywhere.
"""

WEB_DIRECTORY = "./web"  # the 4D player (web/mv4d_player.js) and its node widget (web/mv4d_preview.js)


async def comfy_entrypoint():
    from .nodes import MV4DExtension  # imports comfy_api, which exists only inside ComfyUI

    return MV4DExtension()
