"""Read NIfTI (.nii, .nii.gz) CT volumes stored in HU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from n2g_ct.errors import InputError
from n2g_ct.io.volume import CTVolume

if TYPE_CHECKING:
    from n2g_ct.io.dicom_writer import Clipping

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


def write_nifti(path: Path, hu: np.ndarray, template: CTVolume) -> Clipping:
    """Write ``hu`` (z, y, x) to ``path`` with the header of the NIfTI file ``template`` was read from.

    Everything in the header stays: class (NIfTI-1/2), affine, qform/sform and their codes, units,
    description, intent, data type and scaling. An integer data type stores
    ``round((HU − scl_inter) / scl_slope)`` clipped to the type's range; a float type stores HU.

    Returns:
        The voxels clipped below and above the data type's range.

    Raises:
        InputError: ``template`` was not read from a NIfTI file, or its shape differs from ``hu``'s.
    """
    from n2g_ct.io.dicom_writer import Clipping, hu_to_stored

    if template.nifti_header is None or not template.source_paths:
        raise InputError("a NIfTI output needs a volume read from NIfTI (its header is the template)")
    if hu.shape != template.shape:
        raise InputError(f"volume of shape {hu.shape} for a template of shape {template.shape}")
    source: Any = nib.load(template.source_paths[0])  # a Nifti1Image or Nifti2Image
    slope, inter = float(source.dataobj.slope), float(source.dataobj.inter)
    header = template.nifti_header.copy()
    dtype = header.get_data_dtype()
    data = hu.transpose(2, 1, 0)
    clipping = Clipping(voxels=data.size)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data, clipping = hu_to_stored(data, slope, inter, (int(info.min), int(info.max)), dtype)
    else:
        data = ((data - inter) / slope).astype(dtype)
    image = type(source)(data, None, header)
    image.header.set_slope_inter(slope, inter)  # kept as given: nibabel then writes the values unscaled
    image.to_filename(path)
    return clipping


def write_volume_nifti(path: Path, hu: np.ndarray, template: CTVolume) -> Clipping:
    """Write ``hu`` (z, y, x), processed from ``template`` (read from any format), as a NIfTI file:
    the template's own header when it was read from NIfTI, else int16 HU with the template's
    geometry as a RAS affine (qform and sform, scanner coordinates).

    Raises:
        InputError: the template's slices are not a regular grid (one affine cannot place them).
    """
    if template.nifti_header is not None:
        return write_nifti(path, hu, template)
    from n2g_ct.io.dicom_writer import hu_to_stored

    template.require_regular_grid("a NIfTI file")
    info = np.iinfo(np.int16)
    data, clipping = hu_to_stored(hu.transpose(2, 1, 0), 1.0, 0.0, (int(info.min), int(info.max)), np.dtype(np.int16))
    image = nib.Nifti1Image(data, template.affine_ras())
    image.header.set_xyzt_units("mm")
    image.set_qform(template.affine_ras(), code=1)
    image.set_sform(template.affine_ras(), code=1)
    image.to_filename(path)
    return clipping
