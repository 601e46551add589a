"""Synthetic noise models of the Noise2Grad paper's natural-image experiments (Lin et al., IJCAI 2021).

Images are float arrays in [0, 1] of any shape ((H, W) grey or (C, H, W) colour). Each model draws
one noise level per image (fixed, or uniform in a range) and returns the noisy image clipped to
[0, 1], as the paper's code does:

- ``gaussian``: ``x = y + σ/255 · N(0, 1)``; σ on the 0-255 scale (paper: 25, or uniform in (0, 50]).
- ``speckle``: ``x = y + y · n``, ``n`` uniform with zero mean and variance ``v``, i.e. on
  ``[−√(3v), √(3v)]`` (paper: 0.1, or uniform in (0, 0.2]).
- ``poisson``: ``x = Poisson(λ · y) / λ`` (paper: 30, or uniform in [5, 50]).

Every draw takes an explicit ``numpy.random.Generator``: the same seed gives the same noisy image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

NoiseKind = Literal["gaussian", "speckle", "poisson"]


@dataclass(frozen=True)
class NoiseModel:
    """One of the paper's noise models with a fixed or per-image random level.

    Attributes:
        kind: ``gaussian``, ``speckle`` or ``poisson``.
        level: the fixed level: σ on the 0-255 scale (gaussian), variance ``v`` (speckle) or the
            photon scale λ (poisson).
        level_range: instead of ``level``: [low, high], one level drawn uniformly per image.
    """

    kind: NoiseKind
    level: float | None = None
    level_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "speckle", "poisson"):
            raise ValueError(f"noise kind must be gaussian, speckle or poisson, got {self.kind!r}")
        if (self.level is None) == (self.level_range is None):
            raise ValueError("give a noise level or a level_range, not both")
        low, high = self.level_range or (self.level, self.level)
        if not 0.0 <= low <= high or high <= 0.0:
            raise ValueError(f"noise level must be > 0 (a range: 0 ≤ low ≤ high, high > 0), got {low}, {high}")

    @property
    def name(self) -> str:
        """A short label, e.g. ``gaussian σ=25`` or ``poisson λ∈[5, 50]``."""
        symbol = {"gaussian": "σ", "speckle": "v", "poisson": "λ"}[self.kind]
        if self.level is not None:
            return f"{self.kind} {symbol}={self.level:g}"
        low, high = self.level_range
        return f"{self.kind} {symbol}∈[{low:g}, {high:g}]"

    def draw_level(self, rng: np.random.Generator) -> float:
        """This image's level: the fixed one, or uniform in ``level_range`` (never exactly 0)."""
        if self.level is not None:
            return float(self.level)
        low, high = self.level_range
        return float(max(rng.uniform(low, high), 1e-3 * high))

    def gaussian_sigma(self, level: float) -> float | None:
        """The noise std on the [0, 1] scale for a Gaussian level; None for the other kinds."""
        return level / 255.0 if self.kind == "gaussian" else None

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """A noisy version of ``clean`` (values in [0, 1]) and the level drawn for it.

        Returns:
            (noisy float32 array of ``clean``'s shape, clipped to [0, 1]; level).
        """
        y = np.asarray(clean, dtype=np.float64)
        level = self.draw_level(rng)
        if self.kind == "gaussian":
            noisy = y + rng.standard_normal(y.shape) * (level / 255.0)
        elif self.kind == "speckle":
            half_width = math.sqrt(3.0 * level)
            noisy = y + y * rng.uniform(-half_width, half_width, y.shape)
        else:
            noisy = rng.poisson(level * y) / level
        return np.clip(noisy, 0.0, 1.0).astype(np.float32), level
