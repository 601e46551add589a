"""The HU window that maps CT numbers to the network's [0, 1] and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class HUWindow:
    """``low`` HU → 0 and ``high`` HU → 1, linear, clipped outside (the network's input domain).

    The default, [-1024, 3072] HU, spans air to dense bone and metal-free CT's 12-bit range; it is
    also the evaluation's full window (:mod:`n2g_ct.quality.metrics`).

    >>> window = HUWindow()
    >>> float(window.to_unit(np.float32(1024.0))), float(window.to_hu(np.float32(0.5)))
    (0.5, 1024.0)
    """

    low: float = -1024.0
    high: float = 3072.0

    def __post_init__(self) -> None:
        if not float(self.high) > float(self.low):
            raise ValueError(f"HU window must be [low, high] with low < high (HU), got {[self.low, self.high]}")

    @classmethod
    def of(cls, values: Sequence[float]) -> HUWindow:
        """From ``[low, high]`` (a config's or checkpoint's ``window_hu``)."""
        low, high = (float(v) for v in values)
        return cls(low, high)

    @property
    def width(self) -> float:
        """``high − low``, HU: one unit of the network's domain."""
        return float(self.high) - float(self.low)

    def to_unit(self, hu: Array) -> Array:
        """HU → [0, 1], clipped; same type, shape and (floating) dtype."""
        unit = (hu - self.low) / self.width
        return unit.clamp(0.0, 1.0) if isinstance(unit, torch.Tensor) else np.clip(unit, 0.0, 1.0)

    def to_hu(self, unit: Array) -> Array:
        """[0, 1] → HU (the inverse of :meth:`to_unit` inside the window)."""
        return unit * self.width + self.low

    def as_list(self) -> list[float]:
        """``[low, high]``, as configs and checkpoints store it."""
        return [float(self.low), float(self.high)]
