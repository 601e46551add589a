"""The in-memory CT volume every reader returns and every writer takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its geometry.

    Array axes are (z, y, x) = (slice, row, column). Geometry follows ITK/SimpleITK in the DICOM
    patient frame (LPS, millimetres), so ``spacing_xyz``/``origin_xyz``/``direction`` compare
    directly with ``sitk.Image.GetSpacing()``/``GetOrigin()``/``GetDirection()``.

    Attributes:
        hu: float32 array (z, y, x), Hounsfield units.
        spacing_xyz: voxel size (column, row, slice) in mm.
        origin_xyz: LPS position (mm) of the centre of voxel (0, 0, 0), i.e. of the first slice.
        direction: 3×3 matrix whose columns are the LPS unit vectors of the x, y and z axes.
        padding_mask: bool (z, y, x), True where the scanner stored PixelPaddingValue
            (outside the reconstructed field of view); ``None`` when the source has no padding.
        datasets: one pydicom ``Dataset`` per slice, in array order, with PixelData removed:
            the templates for a derived series. Empty for NIfTI input.
        source_paths: the file per slice (DICOM) or the single file (NIfTI).
        skipped_paths: files of the series left out as unusable (truncated, corrupt, no pixels).
        series_uid: SeriesInstanceUID (DICOM) or ``None``.
        nifti_header: the source ``nibabel`` header for NIfTI input, else ``None``.
    """

    hu: np.ndarray
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: np.ndarray
    padding_mask: np.ndarray | None = None
    datasets: list[Any] = field(default_factory=list)
    source_paths: list[Path] = field(default_factory=list)
    skipped_paths: list[Path] = field(default_factory=list)
    series_uid: str | None = None
    nifti_header: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def affine_lps(self) -> np.ndarray:
        """4×4 voxel-index (x, y, z) → LPS mm matrix."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing_xyz)
        affine[:3, 3] = self.origin_xyz
        return affine

    def affine_ras(self) -> np.ndarray:
        """4×4 voxel-index (x, y, z) → RAS mm matrix (the NIfTI/nibabel convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()
