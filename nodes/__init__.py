"""ComfyUI node classes (V3 schema), one module per pipeline stage. Imported only by ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from .aware_denoising import AwareDenoising, AwareReconstruction
from .cameras import LoadCameraTrajectory, OrbitCameras
from .cvd import ApplyCVD, LoadCVDModule
from .composition import (ComposedGuiderNode, DecodeGrid, GridConditioningNode, PromptGridConditioningNode, ReferenceRowLatent,
                          RollbackEuler, SV3DConditioning)
from .epipolar import EpipolarMask, PreviewEpipolarMask
from .fourdm import FourDMConditioning, Load4DM, Refine4DWithSDS
from ..integration.host import register_model_folders
from .load_multiview import LoadMultiviewImages
from .alignment import ApplyAlignmentAdapters, LoadAlignmentAdapters, MakeDemoTrainingSet, TrainAlignmentAdapters
from .motion import ApplyCameraControl, ApplyMotionModule, LoadCameraCtrl, LoadMotionModule
from .multiview import ImageDreamConditioning, LoadMultiviewModel, MultiviewConditioning
from .multiview_video import ExampleScene, ImagesToMultiviewVideo, MultiviewVideoToImages
from .preview_4d import Preview4D
from .speed import CompileAndKeepNode, FuseElementwiseNode, Fp8MatmulsNode
from .splats import Fit4DGaussians, Load4D, Render4D, Save4D

NODES: list[type[io.ComfyNode]] = [
    OrbitCameras, LoadCameraTrajectory, EpipolarMask, PreviewEpipolarMask,
    LoadMultiviewImages, ImagesToMultiviewVideo, MultiviewVideoToImages, ExampleScene,
    LoadMultiviewModel, MultiviewConditioning, ImageDreamConditioning,
    LoadMotionModule, ApplyMotionModule, LoadCameraCtrl, ApplyCameraControl, LoadCVDModule, ApplyCVD,
    LoadAlignmentAdapters, ApplyAlignmentAdapters, TrainAlignmentAdapters, MakeDemoTrainingSet,
    Load4DM, FourDMConditioning, Refine4DWithSDS,
    SV3DConditioning, GridConditioningNode, PromptGridConditioningNode, ReferenceRowLatent, ComposedGuiderNode, RollbackEuler, DecodeGrid, Fp8MatmulsNode, FuseElementwiseNode, CompileAndKeepNode,
    AwareDenoising, AwareReconstruction,
    Fit4DGaussians, Render4D, Save4D, Load4D, Preview4D,
]


class MV4DExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folders()
        return NODES
