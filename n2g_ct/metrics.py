"""Image-quality metrics on HU slices, always with an explicit window and data range.

Two protocols (DESIGN §5): the display window [-160, 240] HU clipped, data range 400 HU (the
RED-CNN/CTformer/Noise2Sim convention), and the full window [-1024, 3072] HU, data range 4096.
SSIM uses a Gaussian window of 11 pixels, σ = 1.5, population covariance, over the whole slice
on the clipped HU values (MONAI's SSIM; equal to ``skimage.metrics.structural_similarity`` on the
same clipped arrays with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=high − low``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """An HU window: values are clipped to [low, high]; the data range is ``high − low``."""

    name: str
    low: float
    high: float

    @property
    def data_range(self) -> float:
        """high − low, in HU."""
        return self.high - self.low


DISPLAY_WINDOW = Window("display", -160.0, 240.0)
FULL_WINDOW = Window("full", -1024.0, 3072.0)
WINDOWS = (DISPLAY_WINDOW, FULL_WINDOW)
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5


def psnr(prediction_hu: Tensor, reference_hu: Tensor, window: Window) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, both images clipped to ``window`` first.

    ``PSNR = 10·log10(R² / MSE)`` with ``R = window.data_range``.

    Args:
        prediction_hu, reference_hu: (B, C, H, W) HU.

    Returns:
        (B,) dB; ``inf`` where the clipped images are identical.

    >>> ref = torch.zeros(1, 1, 4, 4)
    >>> round(float(psnr(ref + 40.0, ref, DISPLAY_WINDOW)[0]), 2)  # 40 HU error, range 400
    20.0
    """
    p = prediction_hu.float().clamp(window.low, window.high)
    r = reference_hu.float().clamp(window.low, window.high)
    mse = (p - r).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(window.data_range**2 / mse)


def ssim(prediction_hu: Tensor, reference_hu: Tensor, window: Window) -> Tensor:
    """Structural similarity per image, both images clipped to ``window`` (see module docstring).

    Args:
        prediction_hu, reference_hu: (B, C, H, W) HU, H and W ≥ 11.

    Returns:
        (B,) SSIM in [-1, 1].
    """
    from monai.metrics.regression import compute_ssim_and_cs

    p = prediction_hu.float().clamp(window.low, window.high)
    r = reference_hu.float().clamp(window.low, window.high)
    ssim_map, _ = compute_ssim_and_cs(
        p,
        r,
        spatial_dims=2,
        kernel_size=(SSIM_WINDOW_SIZE, SSIM_WINDOW_SIZE),
        kernel_sigma=(SSIM_SIGMA, SSIM_SIGMA),
        data_range=window.data_range,
    )
    return ssim_map.flatten(1).mean(dim=1)
