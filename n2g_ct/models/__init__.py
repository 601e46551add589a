"""Networks of Noise2Grad: the denoiser F (U-Net) and the noise approximator G (1×1 conv or spectral gain).

Use the builders: they apply the official code's initialisation (pix2pix ``init_weights``,
type ``normal``, gain 0.02): every conv weight ~ N(0, 0.02²), every bias 0. The zero bias of G
matters: G is trained only by the gradient loss, which is blind to a constant offset, so G's bias
never receives a gradient and keeps its initial value (PyTorch's default would draw it from
U(−1, 1) for one channel and add that offset, with a random sign per pixel, to every
synthetic image).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from n2g_ct.models.noise_approx import MeasuredNoiseSpectrum, NoiseApproximator, SpectralNoiseGain
from n2g_ct.models.unet import UNet

__all__ = [
    "OFFICIAL_INIT_STD",
    "MeasuredNoiseSpectrum",
    "STARTER_MODEL",
    "NoiseApproximator",
    "SpectralNoiseGain",
    "UNet",
    "build_denoiser",
    "build_noise_approximator",
    "official_init_",
]

OFFICIAL_INIT_STD = 0.02
"""Standard deviation of the official N(0, std²) conv-weight initialisation."""
STARTER_MODEL = Path(__file__).parent / "starter_chest_quarter_dose.pt"
"""The shipped starter model (README, "Starter model"): ``n2g-ct denoise``'s default and the demo's starting point."""


def official_init_(module: nn.Module, std: float = OFFICIAL_INIT_STD) -> nn.Module:
    """Initialise every ``Conv2d`` in ``module`` in place: weight ~ N(0, std²), bias 0.

    Draws from the global torch RNG (seed it with ``torch.manual_seed``). Returns ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_denoiser(
    in_channels: int = 1,
    out_channels: int | None = None,
    base_width: int = 32,
    depth: int = 3,
    residual: bool = False,
    local_mean_px: float = 0.0,
) -> UNet:
    """The noise-removal U-Net F with the official initialisation (see `UNet` for the arguments).

    A residual U-Net starts close to the identity (its head's weights are small), not at it: the
    removed image ``x − F(x)`` must not be exactly zero at the start, since Noise2Grad shapes it
    into the synthetic noise.
    """
    network = official_init_(UNet(in_channels, out_channels, base_width, depth, residual, local_mean_px))
    return network


def build_noise_approximator(channels: int = 1, init_scale: float | None = None) -> NoiseApproximator:
    """The noise-approximation module G.

    Args:
        channels: image channels (in = out).
        init_scale: ``None`` (paper): the official init, weight ~ N(0, 0.02²), bias 0, so the
            first synthetic noise is ~50× weaker than the removed noise. A number ``s``:
            weight = ``s``·identity, bias 0, i.e. G starts as ``n_tilde = s·n_hat``.
    """
    approximator = NoiseApproximator(channels)
    if init_scale is None:
        return official_init_(approximator)
    if not math.isfinite(init_scale):
        raise ValueError(f"init_scale must be a finite number or None, got {init_scale!r}")
    with torch.no_grad():
        approximator.weight.copy_(init_scale * torch.eye(channels).view(channels, channels, 1, 1))
        approximator.bias.zero_()
    return approximator
