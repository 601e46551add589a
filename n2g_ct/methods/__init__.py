"""Training methods: what turns a batch into a loss. The trainer calls each through `TrainingMethod`.

- :mod:`~n2g_ct.methods.noise2grad`: Noise2Grad from unpaired noisy and clean pools (the product).
- :mod:`~n2g_ct.methods.paired`: supervised and Noise2Noise baselines from paired slices.
"""

from __future__ import annotations

from torch import nn

from n2g_ct.methods.base import StepResult, TrainingMethod
from n2g_ct.methods.noise2grad import Noise2Grad, Noise2GradOptions
from n2g_ct.methods.paired import PairedMethod

METHODS = ("noise2grad", "supervised", "noise2noise")

__all__ = ["METHODS", "Noise2Grad", "Noise2GradOptions", "PairedMethod", "StepResult", "TrainingMethod", "build_method"]


def build_method(name: str, denoiser: nn.Module, options: Noise2GradOptions, channels: int) -> TrainingMethod:
    """The method ``name`` (one of `METHODS`) around ``denoiser``; ``options`` apply to Noise2Grad."""
    if name == "noise2grad":
        return Noise2Grad(denoiser, options, channels)
    if name in METHODS:
        return PairedMethod(denoiser)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
