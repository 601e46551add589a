"""Shared test set-up: make ``tests/`` importable for the data factories; a torch device fixture."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread: OpenMP threads that spin while another process holds the cores slow tiny
# models down tenfold or more on a busy 2-core machine; one thread keeps test times predictable.
torch.set_num_threads(1)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Each test using it runs on the CPU, and on CUDA too when a GPU is present."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
