"""A procedural chest CT phantom in HU, for the demo and for tests that need anatomy-like images.

Per slice: air around a body outline with a subcutaneous fat layer, muscle, two lungs with
parenchyma texture and vessels, a mediastinum with a contrast-filled aorta and heart, a vertebra
(cortical rim, cancellous core), ribs, and soft-tissue texture. Shapes drift smoothly along z, so
neighbouring slices differ like real contiguous slices. A little correlated noise (``noise_hu``)
plays the routine-dose scanner noise. Seeded and deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from n2g_ct import __version__

SOFTWARE_VERSION = f"n2g-ct {__version__}"

AIR, LUNG, FAT, SOFT_TISSUE, BLOOD, CANCELLOUS, CORTICAL = -1000.0, -860.0, -100.0, 45.0, 180.0, 250.0, 900.0


def _blur(images: np.ndarray, sigma_px: float) -> np.ndarray:
    """(..., y, x) images blurred in-plane by a Gaussian of ``sigma_px`` pixels (edges reflected)."""
    shape = images.shape
    flat = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, *shape[-2:])
    radius = max(1, int(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(flat, (radius,) * 4, mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1)).reshape(shape).numpy()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred in-plane by a Gaussian of ``sigma_px`` pixels."""
    blurred = _blur(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return blurred / max(float(blurred.std()), 1e-12)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def chest_phantom(slices: int = 24, size: int = 256, *, seed: int = 0, noise_hu: float = 12.0,
                  resolution_px: float = 0.0) -> np.ndarray:
    """A chest-like HU volume.

    Args:
        slices: number of slices (z).
        size: in-plane size (pixels, square).
        seed: seed of textures, vessels and noise.
        noise_hu: std of the added correlated noise (routine-dose look), HU.
        resolution_px: std (pixels) of a Gaussian point-spread function applied to the anatomy
            before the noise, as a scanner's reconstruction blurs edges; 0 leaves edges one pixel sharp.

    Returns:
        float32 (slices, size, size), HU rounded to integers, ≥ -1024.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size  # unit square coordinates
    volume = np.empty((slices, size, size), np.float32)
    texture = _smooth_noise(rng, (slices, size, size), sigma_px=size / 64)
    fine = _smooth_noise(rng, (slices, size, size), sigma_px=size / 256)
    vessel_field = _smooth_noise(rng, (slices, size, size), sigma_px=size / 96)
    noise = _smooth_noise(rng, (slices, size, size), sigma_px=0.8)
    for k in range(slices):
        t = k / max(slices - 1, 1)  # 0 (lung bases) → 1 (apices)
        image = np.full((size, size), AIR, np.float32)
        body = _ellipse(yy, xx, 0.52, 0.5, 0.30, 0.42)
        inner = _ellipse(yy, xx, 0.52, 0.5, 0.27, 0.385)
        image[body] = FAT
        image[inner] = SOFT_TISSUE + 12 * texture[k][inner]
        lung_ry, lung_rx = 0.17 + 0.03 * np.sin(np.pi * t), 0.13 + 0.02 * t
        for side in (-1, 1):
            lung = _ellipse(yy, xx, 0.50, 0.5 + side * 0.19, lung_ry, lung_rx)
            image[lung] = LUNG + 40 * fine[k][lung]
            vessels = lung & (np.abs(vessel_field[k]) < 0.08 + 0.04 * t)
            image[vessels] = -80 + 60 * fine[k][vessels]
        mediastinum = _ellipse(yy, xx, 0.50, 0.5, 0.13 - 0.03 * t, 0.07)
        image[mediastinum] = SOFT_TISSUE + 8 * texture[k][mediastinum]
        heart = _ellipse(yy, xx, 0.46, 0.53, 0.09 * (1 - 0.6 * t), 0.08 * (1 - 0.6 * t))
        image[heart] = 40 + 6 * texture[k][heart]
        aorta = _ellipse(yy, xx, 0.58, 0.52, 0.025, 0.025)
        image[aorta] = BLOOD + 5 * fine[k][aorta]
        vertebra = _ellipse(yy, xx, 0.72, 0.5, 0.06, 0.055)
        core = _ellipse(yy, xx, 0.72, 0.5, 0.045, 0.04)
        image[vertebra] = CORTICAL
        image[core] = CANCELLOUS + 60 * texture[k][core]
        for angle in np.linspace(0.15, np.pi - 0.15, 7):
            for side in (-1, 1):
                cy = 0.52 - 0.265 * np.sin(angle) * (0.95 if side < 0 else 1.0)
                cx = 0.5 + side * 0.37 * np.cos(angle) * (1 - 0.1 * t)
                rib = _ellipse(yy, xx, cy + 0.02 * np.sin(2 * np.pi * t + angle), cx, 0.012, 0.018)
                image[rib & body] = CORTICAL - 200
        volume[k] = image
    if resolution_px > 0:
        volume = _blur(volume, resolution_px)
    volume += noise_hu * noise
    return np.clip(np.round(volume), -1024, None).astype(np.float32)


def write_phantom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 2.0),
    seed: int = 0,
    description: str = "n2g-ct procedural chest phantom",
) -> list[Path]:
    """Write ``hu`` (z, y, x) as a complete CT Image series of a synthetic patient ("PHANTOM").

    Axial, head-first supine, slices ascending in z from 0 mm; pixels uint16 with RescaleIntercept
    -1024 (as many scanners store them); UIDs derived from ``seed`` (same seed, same UIDs).

    Returns:
        the slice files in z order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ny, nx = hu.shape[1:]
    origin = (-(nx - 1) / 2 * spacing_xyz[0], -(ny - 1) / 2 * spacing_xyz[1], 0.0)

    def uid(kind: str, index: int = 0) -> str:
        return generate_uid(entropy_srcs=["n2g-ct phantom", str(seed), kind, str(index)])

    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
    paths = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("instance", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality, ds.Manufacturer, ds.SoftwareVersions = "CT", "n2g-ct", SOFTWARE_VERSION
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, k + 1, 1
        ds.SeriesDescription, ds.BodyPartExamined, ds.PatientPosition = description, "CHEST", "HFS"
        ds.PositionReferenceIndicator, ds.KVP = "", "120"
        ds.ImagePositionPatient = [f"{origin[0]:.3f}", f"{origin[1]:.3f}", f"{k * spacing_xyz[2]:.3f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{k * spacing_xyz[2]:.3f}"
        ds.PixelSpacing = [f"{spacing_xyz[1]:g}", f"{spacing_xyz[0]:g}"]
        ds.SliceThickness = f"{spacing_xyz[2]:g}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
