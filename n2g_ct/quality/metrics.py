"""Image-quality metrics on HU slices, always with an explicit window and data range.

Two protocols: the display window [-160, 240] HU clipped, data range 400 HU (the
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

from n2g_ct.io.hu_window import HUWindow


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
FULL_WINDOW = Window("full", HUWindow().low, HUWindow().high)
"""The network's default window (:class:`~n2g_ct.io.hu_window.HUWindow`): air to dense bone."""
WINDOWS = (DISPLAY_WINDOW, FULL_WINDOW)
IMAGE_RANGE = Window("image", 0.0, 1.0)
"""Natural images in [0, 1] (the paper's experiments): clipped to [0, 1], data range 1."""
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-image mean of (B, C, H, W) ``values`` over the True pixels of ``mask`` (all when None)."""
    if mask is None:
        return values.flatten(1).mean(dim=1)
    weights = mask.to(values.dtype).expand_as(values).flatten(1)
    return (values.flatten(1) * weights).sum(dim=1) / weights.sum(dim=1)


def psnr(prediction_hu: Tensor, reference_hu: Tensor, window: Window, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, both images clipped to ``window`` first.

    ``PSNR = 10·log10(R² / MSE)`` with ``R = window.data_range``.

    Args:
        prediction_hu, reference_hu: (B, C, H, W) HU.
        mask: optional bool (B or 1, 1, H, W); the MSE is taken over its True pixels (e.g. the
            field of view, keeping CT padding out).

    Returns:
        (B,) dB; ``inf`` where the clipped images are identical.

    >>> ref = torch.zeros(1, 1, 4, 4)
    >>> round(float(psnr(ref + 40.0, ref, DISPLAY_WINDOW)[0]), 2)  # 40 HU error, range 400
    20.0
    """
    p = prediction_hu.float().clamp(window.low, window.high)
    r = reference_hu.float().clamp(window.low, window.high)
    mse = _masked_mean((p - r).pow(2), mask)
    return 10 * torch.log10(window.data_range**2 / mse)


def ssim(prediction_hu: Tensor, reference_hu: Tensor, window: Window, mask: Tensor | None = None) -> Tensor:
    """Structural similarity per image, both images clipped to ``window`` (see module docstring).

    Args:
        prediction_hu, reference_hu: (B, C, H, W) HU, H and W ≥ 11.
        mask: optional bool (B or 1, 1, H, W); the SSIM map is averaged over its True pixels. The
            map, like skimage's, leaves out the 5-pixel border where the 11-pixel window does not fit.

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
    border = SSIM_WINDOW_SIZE // 2
    inner = None if mask is None else mask[..., border:-border, border:-border]
    return _masked_mean(ssim_map, inner)


def windowed_scores(prediction_hu: Tensor, reference_hu: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """PSNR and SSIM per image in every window of :data:`WINDOWS`: ``psnr_display``, ``ssim_display``,
    ``psnr_full``, ``ssim_full``, each (B,) for (B, 1, H, W) HU images (``mask`` as for :func:`psnr`)."""
    scores = {}
    for window in WINDOWS:
        scores[f"psnr_{window.name}"] = psnr(prediction_hu, reference_hu, window, mask)
        scores[f"ssim_{window.name}"] = ssim(prediction_hu, reference_hu, window, mask)
    return scores
