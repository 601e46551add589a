"""BM3D baseline for correlated CT noise (optional extra: ``pip install 'n2g-ct[bm3d]'``).

CT noise is spatially correlated (the reconstruction filter shapes its spectrum), so BM3D is given
a noise power spectrum, not a scalar σ: with a scalar it assumes white noise and leaves the
low-frequency, blotchy part of CT noise in place. Two PSDs, both per slice (noise varies along z
with tube-current modulation):

- **estimated** (:func:`estimate_noise_psd`), from the low-dose slice alone, no reference: the NPS
  of :func:`n2g_ct.quality.ct_measures.estimate_noise_nps`, measured in the slice's own uniform soft-tissue
  ROIs (chosen on a smoothed copy, so that the noise does not choose them), each minus its
  least-squares plane. Residual anatomy in the ROIs adds low-frequency power.
- **oracle** (:func:`oracle_noise_psd`), an upper bound that uses the reference: the NPS of
  (low-dose − reference) over every grid square inside the body. It includes the reference's own
  noise, so it slightly overstates the low-dose noise when the reference is itself a real scan.

Either NPS, measured on ``s × s`` ROIs, is mapped to the slice size through its autocovariance
(:func:`psd_for_bm3d`).

BENCHMARKS.md measures the estimated PSD's BM3D beside the denoisers on every CT benchmark
(``n2g-ct evaluate --bm3d``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from n2g_ct.datasets.cache import TISSUE_THRESHOLD_HU
from n2g_ct.errors import N2GError
from n2g_ct.quality.ct_measures import (
    DEFAULT_KEEP_FRACTION,
    DEFAULT_ROI_SIZE_PX,
    SOFT_TISSUE_HU,
    estimate_noise_nps,
    grid_corners,
    noise_power_spectrum,
    roi_patches,
)

log = logging.getLogger(__name__)

BM3D_INSTALL_HINT = "pip install 'n2g-ct[bm3d]'"
_UNIT_SPACING = (1.0, 1.0)


def import_bm3d() -> ModuleType:
    """The ``bm3d`` package.

    Raises:
        N2GError: it is not installed (the message says how to install it).
    """
    try:
        import bm3d
    except ImportError:
        raise N2GError(f"the BM3D baseline needs the optional package bm3d: {BM3D_INSTALL_HINT}") from None
    if not hasattr(np, "trapz"):  # bm4d ≤ 4.2.5 calls np.trapz (removed in numpy 2.4) when given a PSD
        setattr(np, "trapz", np.trapezoid)  # noqa: B010
    return bm3d


def psd_for_bm3d(nps_px: np.ndarray, shape_yx: Sequence[int]) -> np.ndarray:
    """A noise PSD in bm3d's convention for an image of ``shape_yx``, from an NPS in pixel units.

    bm3d expects ``PSD[k] = E|DFT(noise)[k]|²`` over the whole (M, N) image (unnormalised numpy
    FFT), so ``PSD.mean()`` is the noise variance. The ``(s, s)`` NPS (HU², pixel spacing 1) is
    turned into its autocovariance (lags within ±s/2), which is placed at the centre of an (M, N)
    zero array and transformed back: the same spectrum sampled on the image's frequency grid (equal
    to the NPS at its own frequencies; slightly negative ringing in between is clipped to 0).

    Args:
        nps_px: (s_y, s_x) NPS from :func:`noise_power_spectrum` with spacing (1, 1), FFT order.
        shape_yx: (M, N) of the image to denoise, M ≥ s_y and N ≥ s_x.

    Returns:
        (M, N) float64 PSD, ≥ 0, in HU²·M·N.

    >>> psd = psd_for_bm3d(np.full((8, 8), 25.0), (32, 16))  # white noise, σ = 5 HU
    >>> bool(np.allclose(psd, 25.0 * 32 * 16)), round(float(psd.mean() / psd.size), 6)  # flat; variance
    (True, 25.0)
    """
    m, n = (int(v) for v in shape_yx)
    sy, sx = nps_px.shape
    if sy > m or sx > n:
        raise ValueError(f"NPS of {nps_px.shape} is larger than the image {tuple(shape_yx)}")
    autocovariance = np.fft.fftshift(np.real(np.fft.ifft2(nps_px)))
    full = np.zeros((m, n))
    top, left = m // 2 - sy // 2, n // 2 - sx // 2
    full[top : top + sy, left : left + sx] = autocovariance
    spectrum = np.real(np.fft.fft2(np.fft.ifftshift(full)))
    return np.clip(spectrum, 0.0, None) * m * n


def estimate_noise_psd(
    low_dose_hu: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    size_px: int = DEFAULT_ROI_SIZE_PX,
    hu_range: Sequence[float] = SOFT_TISSUE_HU,
    keep_fraction: float = DEFAULT_KEEP_FRACTION,
) -> np.ndarray | None:
    """bm3d PSD of one low-dose slice from its own uniform ROIs (no reference; see module docstring).

    Args:
        low_dose_hu: (y, x) HU.
        valid: (y, x) bool, False at padding; None: all valid.
        size_px, hu_range, keep_fraction: as for :func:`n2g_ct.quality.ct_measures.find_uniform_rois`.

    Returns:
        (y, x) PSD for :func:`bm3d_denoise`, or None when the slice has no uniform soft-tissue ROI.
    """
    nps, _ = estimate_noise_nps(low_dose_hu, valid, size_px=size_px, hu_range=hu_range, keep_fraction=keep_fraction)
    return None if nps is None else psd_for_bm3d(nps, low_dose_hu.shape)


def oracle_noise_psd(
    low_dose_hu: np.ndarray, reference_hu: np.ndarray, valid: np.ndarray | None = None, *,
    size_px: int = DEFAULT_ROI_SIZE_PX,
) -> np.ndarray | None:
    """bm3d PSD of (low-dose − reference) over the grid squares inside the body (an upper bound).

    A square is used when it lies wholly in the field of view and the reference's mean in it is
    above -500 HU (tissue, not air).

    Args:
        low_dose_hu, reference_hu: (y, x) HU.
        valid: (y, x) bool, False at padding; None: all valid.
        size_px: square side in pixels.

    Returns:
        (y, x) PSD for :func:`bm3d_denoise`, or None when no square lies in the body.
    """
    corners = grid_corners(low_dose_hu.shape, size_px)
    if valid is not None:
        corners = corners[roi_patches(valid, corners, size_px).all(axis=(1, 2))]
    corners = corners[roi_patches(reference_hu, corners, size_px).mean(axis=(1, 2)) > TISSUE_THRESHOLD_HU]
    if len(corners) == 0:
        return None
    difference = np.asarray(low_dose_hu, np.float64) - np.asarray(reference_hu, np.float64)
    nps = noise_power_spectrum(roi_patches(difference, corners, size_px), _UNIT_SPACING)
    return psd_for_bm3d(nps, low_dose_hu.shape)


def bm3d_denoise(hu: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """BM3D (both stages, profile ``np``) of one slice with a noise PSD.

    Args:
        hu: (y, x) HU.
        psd: (y, x) from :func:`estimate_noise_psd` / :func:`oracle_noise_psd` / :func:`psd_for_bm3d`.

    Returns:
        (y, x) float32 denoised HU.

    Raises:
        N2GError: bm3d is not installed.
    """
    bm3d = import_bm3d()
    return np.asarray(bm3d.bm3d(np.asarray(hu, np.float64), psd), dtype=np.float32)
