"""ComfyUI node classes (V3 schema), one module per pipeline stage. Imported only by ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from .cameras import LoadCameraTrajectory, OrbitCameras
from .epipolar import EpipolarMask, PreviewEpipolarMask

NODES: list[type[io.ComfyNode]] = [OrbitCameras, LoadCameraTrajectory, EpipolarMask, PreviewEpipolarMask]


class MV4DExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
