"""Shared test set-up: make ``tests/`` importable for the data factories; a torch device fixture."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Each test using it runs on the CPU, and on CUDA too when a GPU is present."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
