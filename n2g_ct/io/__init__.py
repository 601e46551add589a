"""Reading CT volumes: DICOM series, single DICOM files and NIfTI, into :class:`CTVolume`."""

from __future__ import annotations

from pathlib import Path

from n2g_ct.io.dicom import DicomSeries, read_dicom_series, scan_dicom, select_one_series
from n2g_ct.io.nifti import is_nifti, read_nifti
from n2g_ct.io.volume import CTVolume

__all__ = ["CTVolume", "DicomSeries", "read_volume", "read_dicom_series", "read_nifti", "scan_dicom"]


def read_volume(path: Path, *, allow_non_ct: bool = False, series_uid: str | None = None) -> CTVolume:
    """Read one CT volume: a NIfTI file, a DICOM file, or a folder holding one DICOM series.

    Args:
        path: ``.nii``/``.nii.gz`` file, DICOM file (its series is read from its own folder only
            when the folder is given; a single file gives a one-slice volume), or series folder.
        allow_non_ct: read series whose Modality is not CT.
        series_uid: pick this series when the folder holds several.

    Raises:
        InputError: the path is missing, holds no image, holds several series and none was
            chosen, or the data are inconsistent (the message names the files).
    """
    path = Path(path)
    if path.is_file() and is_nifti(path):
        return read_nifti(path)
    found = scan_dicom(path, with_pixels=True)
    return read_dicom_series(select_one_series(path, found, series_uid), allow_non_ct=allow_non_ct)
