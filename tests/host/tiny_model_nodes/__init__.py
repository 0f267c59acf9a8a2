"""A test-only ComfyUI node pack, loaded by the host lane's test server next to mv4d: it stands in for
ImageOnlyCheckpointLoader with tiny SVD / SV3D models (real checkpoints cannot be downloaded on test machines),
so a shipped workflow runs end to end with only its loader nodes swapped. Never shipped or registered by mv4d."""

import importlib.util
from pathlib import Path

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


NODE_CLASS_MAPPINGS = {"MV4DTest_TinyCheckpoint": TinyCheckpoint}
