"""The in-memory CT volume every reader returns and every writer takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from n2g_ct.errors import InputError


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
            the templates for a derived series (the frames of a multi-frame file share one).
            Empty for NIfTI input.
        frames: per slice, its frame index in a multi-frame DICOM file, None for single-frame.
        source_paths: the file per slice (DICOM) or the single file (NIfTI).
        slice_positions_lps: (z, 3) LPS position (mm) of each slice's first voxel, or None for a
            regular grid (then computed from origin, direction and spacing).
        grid_problem: why the slices are not a regular grid (irregular spacing, duplicated
            positions, gantry tilt, mixed orientations), or None.
        series_uid: SeriesInstanceUID (DICOM) or ``None``.
        nifti_header: the source ``nibabel`` header for NIfTI input, else ``None``.
    """

    hu: np.ndarray
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: np.ndarray
    padding_mask: np.ndarray | None = None
    datasets: list[Any] = field(default_factory=list)
    frames: list[int | None] = field(default_factory=list)
    source_paths: list[Path] = field(default_factory=list)
    slice_positions_lps: np.ndarray | None = None
    grid_problem: str | None = None
    series_uid: str | None = None
    nifti_header: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def positions_lps(self) -> np.ndarray:
        """(z, 3) LPS position (mm) of each slice's first voxel."""
        if self.slice_positions_lps is not None:
            return self.slice_positions_lps
        step = self.direction[:, 2] * self.spacing_xyz[2]
        return np.asarray(self.origin_xyz) + np.arange(self.shape[0])[:, None] * step

    def require_regular_grid(self, purpose: str) -> None:
        """InputError (one line, with the way out) when the slices are not a regular grid."""
        if self.grid_problem is not None:
            raise InputError(
                f"series {self.series_uid}: {purpose} needs a regular slice grid, but the series has "
                f"{self.grid_problem}; n2g-ct denoise/train/evaluate read it slice by slice, or resample it first"
            )

    def affine_lps(self) -> np.ndarray:
        """4×4 voxel-index (x, y, z) → LPS mm matrix."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing_xyz)
        affine[:3, 3] = self.origin_xyz
        return affine

    def affine_ras(self) -> np.ndarray:
        """4×4 voxel-index (x, y, z) → RAS mm matrix (the NIfTI/nibabel convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()
