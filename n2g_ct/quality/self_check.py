"""Reference-free self-checks: what a denoiser F does to noisy CT slices, judged from the slices alone.

A denoiser trained without references must also be checked without them. CT noise is zero-mean and
independent of the anatomy, so on noisy slices ``x`` with ``r = x − F(x)`` (what F removes):

1. **HU shift**: ``mean(F(x) − x)`` over uniform soft-tissue ROIs (found on F(x)) must be ≈ 0 HU: a
   shift there is a change of CT numbers, not noise removal.
2. **Removed power per band**: the NPS of ``r`` over every tissue tile of the slice, against the
   noise NPS measured in the slice's own uniform soft-tissue ROIs
   (:func:`n2g_ct.quality.ct_measures.estimate_noise_nps`), ring by ring of radial frequency. A denoiser
   removes at most the noise (a Wiener-like one somewhat less); removing several times the noise
   power in a band means removing anatomy (blurring, flattening contrast).
3. **Edge ratio**: ``mean(r²)`` at edge voxels of F(x) (smoothed gradient ≥ 50 HU/mm) over
   ``mean(r²)`` at the other body voxels. Noise removal does not care where edges are (ratio ≈ 1;
   somewhat more where streaks run from bone); a denoiser that blurs removes mostly at edges. Only
   judged where the slices show their noise (check 2 found ROIs): there, what F removes away from
   edges is noise removal, the yardstick; in a small or noise-free image it is not.

:class:`SelfCheck` accumulates slices (a series, or a sample of a training pool) and gives a
:class:`SelfCheckResult` with the values and the checks that fail their :class:`SelfCheckLimits`.
Everything is in HU; statistics pool all slices (ROI-, tile- and voxel-weighted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from n2g_ct.quality.ct_measures import (
    DEFAULT_ROI_SIZE_PX,
    EDGE_GRADIENT_HU_PER_MM,
    NOISE_SELECTION_SMOOTHING_PX,
    estimate_noise_nps,
    find_uniform_rois,
    gaussian_smooth,
    gradient_magnitude,
    grid_corners,
    noise_power_spectrum,
    radial_nps,
    roi_patches,
)

TISSUE_HU = -500.0
"""Voxels of the smoothed input above this HU are tissue (the body), for the removed-power tiles and
the edge ratio (smoothed as for :func:`n2g_ct.quality.ct_measures.estimate_noise_nps`, never F's output: a
broken F must not hide the body)."""
_UNIT_SPACING = (1.0, 1.0)


@dataclass(frozen=True)
class SelfCheckLimits:
    """When a self-check fails.

    Attributes:
        max_hu_shift: largest |mean(F(x) − x)| in uniform soft tissue, HU.
        max_removed_noise_ratio: largest removed power / noise power in any band of radial frequency.
        max_edge_ratio: largest mean removed power at edges / elsewhere in the body. Good
            denoisers (Noise2Grad `default`, BM3D) measured 0.2–1.0 on the CT benchmarks' test series
            (up to 1.5 in training logs); a model
            trained on a far noisier pool that stripped bone detail from quiet slices, 2.3
            (BENCHMARKS.md, "In-house benchmarks").
    """

    max_hu_shift: float = 5.0
    max_removed_noise_ratio: float = 3.0
    max_edge_ratio: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_hu_shift", "max_removed_noise_ratio", "max_edge_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SelfCheckLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SelfCheckResult:
    """The self-check values of a denoiser on some noisy slices, and the checks it fails.

    Attributes:
        slices: slices checked.
        hu_shift_hu: mean(F(x) − x) over the uniform soft-tissue ROIs, HU (NaN without ROIs).
        shift_rois: ROIs behind ``hu_shift_hu``.
        frequency_per_px: (k,) ring frequencies, cycles/pixel.
        noise_nps: (k,) the input's own noise NPS per ring (uniform ROIs), HU²·px².
        removed_nps: (k,) NPS of what F removes, over the tissue tiles, HU²·px².
        noise_std_hu: the input's noise std in its uniform ROIs, HU (NaN without ROIs).
        removed_std_hu: std of what F removes in the tissue tiles (plane-detrended), HU.
        removed_noise_ratio: the largest ``removed_nps / noise_nps`` over the rings (NaN without ROIs).
        edge_ratio: mean removed power at edge voxels / at the other tissue voxels (NaN without edges
            or without the noise ROIs of ``noise_std_hu``).
        failures: one message per failed check; empty when all pass.
    """

    slices: int
    hu_shift_hu: float
    shift_rois: int
    frequency_per_px: tuple[float, ...]
    noise_nps: tuple[float, ...]
    removed_nps: tuple[float, ...]
    noise_std_hu: float
    removed_std_hu: float
    removed_noise_ratio: float
    edge_ratio: float
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return not self.failures

    def describe(self) -> str:
        """The values in one line, e.g. for a log."""
        return (f"HU shift {self.hu_shift_hu:+.1f} HU in soft tissue ({self.shift_rois} ROIs), removed/noise "
                f"power {self.removed_noise_ratio:.2f} (worst band), removed {self.removed_std_hu:.1f} HU of "
                f"{self.noise_std_hu:.1f} HU noise, edge ratio {self.edge_ratio:.2f}")

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, CSV and checkpoints (``passed`` included)."""
        return {"slices": self.slices, "hu_shift_hu": self.hu_shift_hu, "shift_rois": self.shift_rois,
                "noise_std_hu": self.noise_std_hu, "removed_std_hu": self.removed_std_hu,
                "removed_noise_ratio": self.removed_noise_ratio, "edge_ratio": self.edge_ratio,
                "frequency_per_px": list(self.frequency_per_px), "noise_nps": list(self.noise_nps),
                "removed_nps": list(self.removed_nps), "passed": self.passed, "failures": list(self.failures)}


class SelfCheck:
    """Accumulates (noisy, denoised) slice pairs; :meth:`result` gives the pooled self-check values.

    Args:
        limits: when a check fails.
        roi_size_px: side of the ROIs and tiles, pixels (a multiple of 4, ≥ 8).
    """

    def __init__(self, limits: SelfCheckLimits = SelfCheckLimits(), roi_size_px: int = DEFAULT_ROI_SIZE_PX) -> None:
        self.limits = limits
        self.size = roi_size_px
        self.slices = 0
        self._shift = [0.0, 0]  # sum of (F(x) − x) over ROI voxels, ROI count
        self._noise = [np.zeros((roi_size_px, roi_size_px)), 0]  # NPS sum × ROIs, ROIs
        self._removed = [np.zeros((roi_size_px, roi_size_px)), 0]  # NPS sum × tiles, tiles
        self._edges = [0.0, 0, 0.0, 0]  # r² sum and count at edges, then elsewhere in the body

    def add(self, noisy_hu: np.ndarray, denoised_hu: np.ndarray, spacing_mm: Sequence[float],
            valid: np.ndarray | None = None) -> None:
        """Add one slice: ``noisy_hu`` and ``denoised_hu`` (y, x) HU, pixel ``spacing_mm`` (Δy, Δx)."""
        noisy = np.asarray(noisy_hu, np.float64)
        denoised = np.asarray(denoised_hu, np.float64)
        valid = np.ones(noisy.shape, bool) if valid is None else np.asarray(valid, bool)
        removed = noisy - denoised
        size = self.size
        self.slices += 1

        corners = find_uniform_rois(denoised, valid, size_px=size)
        if len(corners):
            self._shift[0] -= float(roi_patches(removed, corners, size).sum())
            self._shift[1] += len(corners)
        noise, count = estimate_noise_nps(noisy, valid, size_px=size)
        if noise is not None:
            self._noise[0] += noise * count
            self._noise[1] += count

        smoothed = gaussian_smooth(noisy, NOISE_SELECTION_SMOOTHING_PX)
        tiles = grid_corners(noisy.shape, size)
        inside = roi_patches(valid, tiles, size).all(axis=(1, 2))
        tissue = roi_patches(smoothed, tiles, size).mean(axis=(1, 2)) > TISSUE_HU
        tiles = tiles[inside & tissue]
        if len(tiles):
            self._removed[0] += noise_power_spectrum(roi_patches(removed, tiles, size), _UNIT_SPACING) * len(tiles)
            self._removed[1] += len(tiles)

        body = valid & (smoothed > TISSUE_HU)
        edges = body & (gradient_magnitude(denoised, spacing_mm) >= EDGE_GRADIENT_HU_PER_MM)
        rest = body & ~edges
        power = removed**2
        self._edges[0] += float(power[edges].sum())
        self._edges[1] += int(edges.sum())
        self._edges[2] += float(power[rest].sum())
        self._edges[3] += int(rest.sum())

    def result(self) -> SelfCheckResult:
        """The pooled values and the failed checks (``ValueError`` before any slice was added)."""
        if self.slices == 0:
            raise ValueError("no slice was checked")
        shift = self._shift[0] / (self._shift[1] * self.size**2) if self._shift[1] else math.nan
        frequency, noise = self._radial(self._noise)
        _, removed = self._radial(self._removed)
        noise_std = math.sqrt(self._noise[0].mean() / self._noise[1]) if self._noise[1] else math.nan
        removed_std = math.sqrt(self._removed[0].mean() / self._removed[1]) if self._removed[1] else math.nan
        ratio = float(np.max(removed / noise)) if self._noise[1] and self._removed[1] else math.nan
        edge_power, edges, rest_power, rest = self._edges
        measurable = edges and rest and rest_power > 0 and self._noise[1]
        edge_ratio = (edge_power / edges) / (rest_power / rest) if measurable else math.nan
        failures = []
        limits = self.limits
        if abs(shift) > limits.max_hu_shift:
            failures.append(f"HU shift {shift:+.1f} HU in uniform soft tissue (limit ±{limits.max_hu_shift:g} HU)")
        if ratio > limits.max_removed_noise_ratio:
            worst = frequency[int(np.argmax(removed / noise))]
            failures.append(f"removes {ratio:.1f}× the noise power at {worst:.2f} cycles/pixel "
                            f"(limit {limits.max_removed_noise_ratio:g}×): it removes anatomy")
        if edge_ratio > limits.max_edge_ratio:
            failures.append(f"removes {edge_ratio:.1f}× as much at edges as elsewhere "
                            f"(limit {limits.max_edge_ratio:g}×): it blurs edges")
        return SelfCheckResult(
            self.slices, shift, self._shift[1], tuple(frequency.tolist()), tuple(noise.tolist()),
            tuple(removed.tolist()), noise_std, removed_std, ratio, edge_ratio, tuple(failures),
        )

    def _radial(self, pooled: list) -> tuple[np.ndarray, np.ndarray]:
        total, count = pooled
        return radial_nps(total / max(count, 1), _UNIT_SPACING)
