"""Tiny generated CT data for the tests: DICOM series and NIfTI files written on the fly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def phantom_hu(shape_zyx: Sequence[int] = (6, 32, 32), seed: int = 0) -> np.ndarray:
    """Integer HU volume (z, y, x) ≥ -1024: air around a water disc with a bone dot, plus noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(yy - ny / 2, xx - nx / 2)
    slice_hu = np.where(r < 0.4 * min(ny, nx), 0.0, -1000.0)
    slice_hu[r < 0.08 * min(ny, nx)] = 700.0
    vol = np.repeat(slice_hu[None], nz, axis=0) + rng.normal(0, 20, (nz, ny, nx))
    vol += np.arange(nz)[:, None, None] * 5.0  # make slices distinguishable
    return np.clip(np.round(vol), -1024, None).astype(np.float32)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing_xyz: Sequence[float] = (0.7, 0.7, 1.0),
    origin_xyz: Sequence[float] = (-11.2, -11.2, -50.0),
    row_cosines: Sequence[float] = (1.0, 0.0, 0.0),
    column_cosines: Sequence[float] = (0.0, 1.0, 0.0),
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-SECRET-42",
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    pixel_padding_value: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_numbers: Sequence[int] | None = None,
    file_names: Sequence[str] | None = None,
    series_description: str = "test series",
) -> list[Path]:
    """Write ``hu`` (z, y, x) as one CT series of uint16 slices; return the paths in z order.

    Slice k sits at origin + k·spacing_z along the normal (row × column cosines). Stored values
    are ``round((hu - intercept) / slope)``. ``pixel_padding_value`` marks voxels with HU ≤ -2000
    as padding. Compressed transfer syntaxes are encoded with pydicom's encoders.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    row = np.asarray(row_cosines, float)
    col = np.asarray(column_cosines, float)
    normal = np.cross(row, col)
    nz, ny, nx = hu.shape
    paths = []
    for k in range(nz):
        stored = np.round((hu[k].astype(np.float64) - intercept) / slope)
        if pixel_padding_value is not None:
            stored[hu[k] <= -2000] = pixel_padding_value
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 3
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        position = np.asarray(origin_xyz, float) + k * spacing_xyz[2] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.PixelSpacing = [spacing_xyz[1], spacing_xyz[0]]
        ds.SliceThickness = spacing_xyz[2]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        if pixel_padding_value is not None:
            ds.PixelPaddingValue = pixel_padding_value
        ds.PixelData = stored.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, stored)
        name = file_names[k] if file_names is not None else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_stored_values(path: Path) -> np.ndarray:
    """The raw stored pixel values of one DICOM file (no rescale)."""
    return pydicom.dcmread(path).pixel_array


def smooth_images(count: int, size: int, seed: int, contrast_hu: float = 150.0) -> np.ndarray:
    """(count, size, size) smooth random HU images (blurred white noise, std ``contrast_hu``)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    images = np.stack([gaussian_filter(rng.normal(0, 1, (size, size)), 6) for _ in range(count)])
    return (images / images.std(axis=(1, 2), keepdims=True) * contrast_hu).astype(np.float32)


def correlated_noise(shape: Sequence[int], sigma_hu: float, seed: int, correlation_px: float = 0.7) -> np.ndarray:
    """Zero-mean Gaussian noise of std ``sigma_hu``, spatially correlated in-plane like CT noise."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(np.random.default_rng(seed).normal(0, 1, shape), (0, correlation_px, correlation_px))
    return (noise / noise.std() * sigma_hu).astype(np.float32)
