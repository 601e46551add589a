"""The noise of a CT volume measured in its uniform soft-tissue windows, per slice (the low-dose
simulator's calibration; the soft-tissue range is :data:`n2g_ct.quality.ct_measures.SOFT_TISSUE_HU`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from n2g_ct.errors import InputError
from n2g_ct.quality.ct_measures import SOFT_TISSUE_HU

log = logging.getLogger(__name__)


SOFT_TISSUE_VOXEL_HU = (-400.0, 500.0)
"""Every voxel of a window must lie in this range (no air, lung or bone edge)."""
NOISE_WINDOW_MM = 8.0
"""Side of the noise windows in mm (at least 5 pixels)."""
MIN_SLICE_WINDOWS = 20
"""A slice's own noise is measured when it holds at least this many windows."""


@dataclass(frozen=True)
class NoiseEstimate:
    """Image noise measured in uniform soft-tissue windows, per slice.

    The slices are tiled into square windows of ``window_px`` pixels (about 8 mm). A window is
    kept when its mean HU is in the soft-tissue range (:data:`SOFT_TISSUE_HU`), all its voxels are in
    :data:`SOFT_TISSUE_VOXEL_HU` and none is padding, and its fitted plane's gradient is at or
    below the median of those windows (the flatter half: organs, muscle, vessels' lumen). A
    window's noise is the standard deviation of its residual from that plane (3 degrees of
    freedom removed). A slice's noise is the median over its windows, which the minority of
    windows holding structure barely moves (measured only in slices with at least
    :data:`MIN_SLICE_WINDOWS` windows); the volume's is the median over those slices.

    Attributes:
        std_hu: the volume's noise, HU.
        slice_std_hu: (z,) each slice's noise, HU; NaN where too few windows.
        windows: bool (z, ny // window_px, nx // window_px), the windows used.
        window_px: window side in pixels.
    """

    std_hu: float
    slice_std_hu: np.ndarray
    windows: np.ndarray
    window_px: int

    def relative(self, image: np.ndarray) -> float:
        """Median over the measured slices of the noise of another (z, y, x) image (e.g. added noise),
        in the same windows, divided by the slice's own noise."""
        return float(np.nanmedian(self.measure_slices(image) / self.slice_std_hu))

    def measure_slices(self, image: np.ndarray) -> np.ndarray:
        """The per-slice statistic (z,) in the same windows of another (z, y, x) image, HU."""
        return _slice_medians(_window_statistics(image, self.window_px, (1.0, 1.0))["noise"], self.windows)

    def subset(self, slices: Sequence[int]) -> NoiseEstimate:
        """The estimate restricted to some slices (their windows and noise)."""
        index = list(slices)
        return NoiseEstimate(self.std_hu, self.slice_std_hu[index], self.windows[index], self.window_px)


def estimate_noise_std(
    hu: np.ndarray, spacing_yx: tuple[float, float], padding_mask: np.ndarray | None = None
) -> NoiseEstimate:
    """Noise standard deviation (HU) of a (z, y, x) volume and of its slices, from uniform soft-tissue windows.

    Raises:
        InputError: no slice holds :data:`MIN_SLICE_WINDOWS` such windows (give ``I0`` explicitly).
    """
    window = max(5, round(NOISE_WINDOW_MM / min(spacing_yx)))
    stats = _window_statistics(hu, window, spacing_yx)
    windows = (
        (stats["mean"] >= SOFT_TISSUE_HU[0]) & (stats["mean"] <= SOFT_TISSUE_HU[1])
        & (stats["min"] >= SOFT_TISSUE_VOXEL_HU[0]) & (stats["max"] <= SOFT_TISSUE_VOXEL_HU[1])
    )
    if padding_mask is not None:
        windows &= _window_statistics(padding_mask.astype(np.float32), window, spacing_yx)["max"] == 0
    if windows.any():
        windows &= stats["gradient"] <= np.median(stats["gradient"][windows])
    slice_std = _slice_medians(stats["noise"], windows)
    if np.isnan(slice_std).all():
        raise InputError(
            f"cannot measure the source's noise: no slice holds {MIN_SLICE_WINDOWS} uniform soft-tissue "
            f"windows of {window} px ({int(windows.sum())} in all); give I0 explicitly (--i0)"
        )
    std = float(np.nanmedian(slice_std))
    log.info(
        "source noise %.1f HU (slices %.1f to %.1f HU), from %d soft-tissue windows of %d px",
        std, np.nanmin(slice_std), np.nanmax(slice_std), int(windows.sum()), window,
    )
    return NoiseEstimate(std, slice_std, windows, window)


def _window_statistics(volume: np.ndarray, window: int, spacing_yx: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per non-overlapping window of (z, y, x): mean, min, max, plane gradient (per mm) and residual std."""
    z, ny, nx = volume.shape
    wy, wx = ny // window, nx // window
    offsets = np.arange(window) - (window - 1) / 2
    plane_norm = window * float(offsets @ offsets)
    out: dict[str, list[np.ndarray]] = {key: [] for key in ("mean", "min", "max", "gradient", "noise")}
    for start in range(0, z, 16):  # bounded memory
        tiles = volume[start : start + 16, : wy * window, : wx * window].astype(np.float64)
        tiles = tiles.reshape(-1, wy, window, wx, window)
        mean = tiles.mean(axis=(2, 4))
        centred = tiles - mean[:, :, None, :, None]
        slope_y = np.einsum("zaibj,i->zab", centred, offsets) / plane_norm
        slope_x = np.einsum("zaibj,j->zab", centred, offsets) / plane_norm
        residual = (centred**2).sum(axis=(2, 4)) - (slope_y**2 + slope_x**2) * plane_norm
        out["mean"].append(mean)
        out["min"].append(tiles.min(axis=(2, 4)))
        out["max"].append(tiles.max(axis=(2, 4)))
        out["gradient"].append(np.hypot(slope_y / spacing_yx[0], slope_x / spacing_yx[1]))
        out["noise"].append(np.sqrt(np.clip(residual, 0, None) / (window * window - 3)))
    return {key: np.concatenate(value) for key, value in out.items()}


def _slice_medians(noise: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(z,) median window noise per slice; NaN for slices with fewer than :data:`MIN_SLICE_WINDOWS` windows."""
    return np.array([np.median(n[w]) if w.sum() >= MIN_SLICE_WINDOWS else np.nan for n, w in zip(noise, windows)])
