"""Make the repository root importable as the package `mv4d`, as ComfyUI imports it from custom_nodes/<folder>.

Nothing is installed for this: the root is registered under the name mv4d before any test module imports it.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Two threads made these 2-core machines ~15x slower; the suite is written for one.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

if "mv4d" not in sys.modules:
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mv4d"] = package
    spec.loader.exec_module(package)
