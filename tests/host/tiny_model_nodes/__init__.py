"""A test-only ComfyUI node pack, loaded by the host lane's test server next to mv4d: it stands in for
ImageOnlyCheckpointLoader with tiny SVD / SV3D models (real checkpoints cannot be downloaded on test machines),
and MV4D Load Multi-view Model with tiny MVDream / ImageDream files, so a shipped workflow runs end to end with
only its loader nodes swapped. Never shipped or registered by mv4d."""

import importlib.util
import sys
from pathlib import Path

# mv4d as the test models import it: the pack this server already loaded (ComfyUI registers a pack under its path),
# else the checkout loaded as package mv4d, as the test suite does.
_ROOT = Path(__file__).resolve().parents[3]
if "mv4d" not in sys.modules:
    _loaded = next((module for module in list(sys.modules.values())
                    if getattr(module, "__file__", None) == str(_ROOT / "__init__.py")), None)
    if _loaded is None:
        _pack = importlib.util.spec_from_file_location("mv4d", _ROOT / "__init__.py", submodule_search_locations=[str(_ROOT)])
        _loaded = importlib.util.module_from_spec(_pack)
        sys.modules["mv4d"] = _loaded
        _pack.loader.exec_module(_loaded)
    sys.modules["mv4d"] = _loaded

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


NODE_CLASS_MAPPINGS = {"MV4DTest_TinyCheckpoint": TinyCheckpoint, "MV4DTest_TinyMultiviewModel": TinyMultiviewModel}
