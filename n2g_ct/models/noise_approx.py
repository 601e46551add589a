"""Noise-approximation module G of Noise2Grad."""

from __future__ import annotations

from torch import nn


class NoiseApproximator(nn.Conv2d):
    """G: one 1×1 convolution with bias, ``channels`` → ``channels`` (Lin et al., IJCAI 2021).

    Maps the removed noise ``n_hat = x − F(x)`` to the extracted noise ``n_tilde`` whose image
    gradient is matched to the noisy input's. Weights start at PyTorch's default init;
    `n2g_ct.models.build_noise_approximator` applies the official init or a scaled identity.

    Shapes:
        input (B, channels, H, W) → output (B, channels, H, W), same units as the input.
    """

    def __init__(self, channels: int = 1) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"NoiseApproximator channels must be an integer >= 1, got {channels!r}")
        super().__init__(channels, channels, kernel_size=1, bias=True)
