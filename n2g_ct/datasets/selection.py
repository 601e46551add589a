"""What the data layer consumes: slice selections of series, paired selections, and a split of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

@dataclass(frozen=True)
class SliceSelection:
    """Some slices of one series (a noisy- or clean-pool entry).

    Attributes:
        series: series folder, single DICOM file or NIfTI file.
        slices: indices in the position-sorted order (z ascending along the slice normal);
            ``None`` means every slice.
    """

    series: Path
    slices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PairSelection:
    """A paired test entry: the same slice positions in a low-dose and a reference series.

    Attributes:
        low_dose: low-dose series (folder, DICOM file or NIfTI).
        reference: reference (routine/full-dose) series of the same scan.
        slices: position-sorted indices in ``low_dose``; ``None`` means every slice.
        reference_slices: the matching indices in ``reference`` (same length as ``slices``);
            left out (``None``) it is set to ``slices``, i.e. both series have the same positions.
    """

    low_dose: Path
    reference: Path
    slices: tuple[int, ...] | None = None
    reference_slices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.reference_slices is None:
            object.__setattr__(self, "reference_slices", self.slices)


@dataclass(frozen=True)
class Split:
    """One named split of a manifest, paths resolved."""

    name: str
    noisy: tuple[SliceSelection, ...]
    clean: tuple[SliceSelection, ...]
    test: tuple[PairSelection, ...]


# --------------------------------------------------------------------------------------------------
# A parsed manifest, with what it recorded about each slice (for checking)
# --------------------------------------------------------------------------------------------------


def evenly_spaced(count: int, wanted: int | None) -> np.ndarray:
    """Indices into ``range(count)``: all of them, or ``wanted`` evenly spaced (first and last included).

    >>> evenly_spaced(10, 4).tolist(), evenly_spaced(3, None).tolist()
    ([0, 3, 6, 9], [0, 1, 2])
    """
    if wanted is None or wanted >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max(wanted, 0)).round().astype(int))
