"""Read NIfTI (.nii, .nii.gz) CT volumes stored in HU."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from n2g_ct.errors import InputError
from n2g_ct.io.volume import CTVolume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path) -> CTVolume:
    """Read a 3-D NIfTI volume of HU values (scl_slope/scl_inter applied) into a :class:`CTVolume`.

    The voxel → RAS affine is converted to ITK's LPS geometry (spacing, origin, direction); the
    header is kept so that a NIfTI output can reuse it.

    Raises:
        InputError: unreadable file, data that is not 3-D (a 4-D series, or a 2-D image), or
            NaN/Inf voxels.
    """
    path = Path(path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(
            f"{path}: NIfTI data has shape {data.shape}; n2g-ct needs one 3-D volume "
            "(split a 4-D series into 3-D files first)"
        )
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} voxel(s) are NaN or Inf; a CT volume must be finite HU")
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise InputError(f"{path}: the NIfTI affine is singular (a zero voxel size)")
    return CTVolume(
        hu=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing_xyz=tuple(float(s) for s in spacing),
        origin_xyz=tuple(float(v) for v in affine_lps[:3, 3]),
        direction=affine_lps[:3, :3] / spacing,
        source_paths=[path],
        nifti_header=image.header.copy(),
    )
