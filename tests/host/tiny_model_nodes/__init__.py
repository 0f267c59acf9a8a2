"""A test-only ComfyUI node pack, loaded by the host lane's test server next to mv4d: it stands in for
ImageOnlyCheckpointLoader with tiny SVD / SV3D models (real checkpoints cannot be downloaded on test machines),
and MV4D Load Multi-view Model with tiny MVDream / ImageDream files, so a shipped workflow runs end to end with
only its loader nodes swapped. Never shipped or registered by mv4d."""

import importlib.util
import sys
from pathlib import Path

# mv4d as the test models import it: the pack this server already loaded (ComfyUI registers a pack and its modules
# under its path), aliased as package mv4d so both share one set of classes; else the checkout loaded as package
# mv4d, as the test suite does.
_ROOT = Path(__file__).resolve().parents[3]
if "mv4d" not in sys.modules:
    _loaded = next((name for name, module in list(sys.modules.items())
                    if getattr(module, "__file__", None) == str(_ROOT / "__init__.py")), None)
    if _loaded is not None:
        for _name, _module in list(sys.modules.items()):
            if _name == _loaded or _name.startswith(_loaded + "."):
                sys.modules["mv4d" + _name[len(_loaded):]] = _module
    else:
        _pack = importlib.util.spec_from_file_location("mv4d", _ROOT / "__init__.py", submodule_search_locations=[str(_ROOT)])
        sys.modules["mv4d"] = importlib.util.module_from_spec(_pack)
        _pack.loader.exec_module(sys.modules["mv4d"])

_spec = importlib.util.spec_from_file_location("mv4d_tiny_models", Path(__file__).resolve().parents[1] / "mv4d_tiny_models.py")
tiny_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_models)


class TinyCheckpoint:
    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MODEL", "CLIP_VISION", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(tiny_models.KINDS),)}}

    def load(self, kind):
        return tiny_models.tiny_checkpoint(kind)


class TinyMultiviewModel:
    """MV4D Load Multi-view Model's outputs for a tiny MVDream / ImageDream file, loaded by mv4d's own loader."""

    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(tiny_models.MULTIVIEW_KINDS),)}}

    def load(self, kind):
        return tiny_models.tiny_multiview_model(kind)


class Tiny4DM:
    """MV4D Load 4DM's outputs for a tiny 4dm.ckpt on the tiny ImageDream file, loaded by mv4d's own loader."""

    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return tiny_models.tiny_4dm_model()


class TinySD15Checkpoint:
    """CheckpointLoaderSimple's outputs for an SD1.5 file: the tiny SD1.5 UNet, text encoder and VAE."""

    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return tiny_models.tiny_sd15_checkpoint()


class TinyMotionModule:
    """MV4D Load Motion Module's output for a tiny AnimateDiff file of the named version."""

    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MV4D_MOTION_MODULE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"version": (list(tiny_models.MOTION_VERSIONS),)}}

    def load(self, version):
        return (tiny_models.tiny_motion_module(version),)


class TinyCameraCtrl:
    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MV4D_CAMERACTRL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (tiny_models.tiny_cameractrl(),)


class TinyCVDModule:
    """MV4D Load CVD Module's output for a tiny CVD.ckpt."""

    CATEGORY = "mv4d_tests"
    RETURN_TYPES = ("MV4D_CVD_MODULE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (tiny_models.tiny_cvd_module(),)


NODE_CLASS_MAPPINGS = {"MV4DTest_TinyCheckpoint": TinyCheckpoint, "MV4DTest_TinyMultiviewModel": TinyMultiviewModel,
                       "MV4DTest_TinySD15Checkpoint": TinySD15Checkpoint, "MV4DTest_TinyMotionModule": TinyMotionModule,
                       "MV4DTest_TinyCameraCtrl": TinyCameraCtrl, "MV4DTest_TinyCVDModule": TinyCVDModule,
                       "MV4DTest_Tiny4DM": Tiny4DM}
