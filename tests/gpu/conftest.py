"""The GPU lane: needs a CUDA GPU (and, for gsplat, the CUDA toolkit); skipped elsewhere with the reason."""

from pathlib import Path

import pytest
import torch

NO_GPU = "no CUDA GPU here: the gpu lane runs on a machine with one (see README, 'Running the tests')"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
                item.add_marker(pytest.mark.skip(reason=NO_GPU))
