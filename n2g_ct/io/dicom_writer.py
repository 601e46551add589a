"""Write a derived DICOM series: processed HU slices, with their source slices' headers as templates.

Per DESIGN.md §6, each derived slice keeps the source's Patient, Study, Frame of Reference,
equipment, geometry and window attributes, and gets

- a new SeriesInstanceUID and SOPInstanceUID (MediaStorageSOPInstanceUID matching), derived
  deterministically from the source UID, the checkpoint hash and the method version
  (:meth:`Derivation.uid`): a re-run makes the same UIDs, another model or version other ones;
- ImageType ``DERIVED\\SECONDARY\\AXIAL``, a DerivationDescription naming software, method,
  precision and checkpoint hash, and a SourceImageSequence item pointing at its source slice;
- SeriesNumber + :data:`SERIES_NUMBER_OFFSET`, the SeriesDescription suffixed with the method;
- new series, content and instance-creation dates/times, and n2g-ct appended to SoftwareVersions;
- pixels in the source's stored representation (BitsAllocated/BitsStored/PixelRepresentation,
  RescaleSlope/Intercept): ``round((HU − intercept) / slope)``, clipped to the stored range, the
  clipped voxels counted; always uncompressed (Explicit VR Little Endian).

Dropped: private tags (vendor data about the source pixels), Smallest/Largest pixel values, icon
images and the source's own derivation codes. A negative SpacingBetweenSlices (seen in real
scanners' files, invalid DICOM) is written as its magnitude. Nothing is added to or changed in
the Patient module.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, generate_uid

from n2g_ct import __version__
from n2g_ct.errors import InputError
from n2g_ct.io.volume import CTVolume

log = logging.getLogger(__name__)

UID_ROOT = PYDICOM_ROOT_UID
"""Root of the derived UIDs: pydicom's (``1.2.826.0.1.3680043.8.498.``), followed by the digits of a
SHA-512 hash of the UID's sources, as ``pydicom.uid.generate_uid(prefix, entropy_srcs)`` makes them."""

SERIES_NUMBER_OFFSET = 1000
"""A derived series is numbered source SeriesNumber + this offset."""

DERIVED_IMAGE_TYPE = ["DERIVED", "SECONDARY", "AXIAL"]

SOFTWARE = f"n2g-ct {__version__}"

# DICOM CID 7202 "Source Image Purposes of Reference".
_PURPOSE_OF_REFERENCE = ("121322", "DCM", "Source image for image processing operation")

# Source attributes that describe the source's pixels or derivation, not the derived ones.
_DROPPED = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "IconImageSequence",
    "DerivationCodeSequence",
)

_SERIES_DESCRIPTION_MAX = 64  # LO


@dataclass(frozen=True)
class Derivation:
    """How a derived series was made: written into each slice and hashed into its UIDs.

    Attributes:
        method: the denoising method (e.g. ``noise2grad``).
        checkpoint_sha256: hex SHA-256 of the checkpoint file.
        precision: arithmetic of the forward pass, ``fp32`` or ``fp16``; the outputs differ, so
            they get different UIDs.
        software: producing software and version (the "method version").
    """

    method: str
    checkpoint_sha256: str
    precision: str = "fp32"
    software: str = SOFTWARE

    def uid(self, kind: str, source_uid: str) -> UID:
        """The derived UID of a source UID (``kind``: ``series`` or ``instance``); deterministic."""
        sources = [
            f"kind={kind};",
            f"source={source_uid};",
            f"checkpoint={self.checkpoint_sha256};",
            f"method={self.method};",
            f"precision={self.precision};",
            f"software={self.software};",
        ]
        return generate_uid(UID_ROOT, entropy_srcs=sources)

    @property
    def description(self) -> str:
        """DerivationDescription text (ST)."""
        return (
            f"Denoised by {self.software}, method {self.method}, precision {self.precision}, "
            f"checkpoint sha256 {self.checkpoint_sha256}"
        )


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """(min, max) stored value of a ``bits_stored``-bit integer pixel."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def hu_to_stored(
    hu: np.ndarray, slope: float, intercept: float, value_range: tuple[int, int], dtype: np.dtype
) -> tuple[np.ndarray, int]:
    """Stored values ``round((hu − intercept) / slope)`` clipped to ``value_range``, as ``dtype``.

    Rounding is to the nearest integer (ties to even), an error of at most ``slope / 2`` HU.

    Returns:
        (stored values, number of values clipped).
    """
    stored = np.rint((hu - np.float32(intercept)) / np.float32(slope))
    low, high = value_range
    clipped = int(np.count_nonzero(stored < low) + np.count_nonzero(stored > high))
    return np.clip(stored, low, high).astype(dtype), clipped


def _series_description(source: Dataset, method: str) -> str:
    suffix = f" [n2g-ct {method}]"
    base = str(source.get("SeriesDescription", "") or "").strip() or "series"
    return base[: _SERIES_DESCRIPTION_MAX - len(suffix)] + suffix


def _software_versions(source: Dataset, software: str) -> list[str]:
    """The source's SoftwareVersions (LO, VM 1-n) with ``software`` appended."""
    values = source.get("SoftwareVersions") or []
    return [str(v) for v in ([values] if isinstance(values, str) else values)] + [software]


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _PURPOSE_OF_REFERENCE
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.SpatialLocationsPreserved = "YES"
    return item


class DerivedSeriesWriter:
    """Writes one derived series into ``folder``, slice by slice as the processed slices arrive.

    Files are named ``IM00000.dcm``, ``IM00001.dcm``, ... in the order written (callers write in
    slice order, ascending along the slice normal). Counts the voxels clipped to the stored range.

    Args:
        folder: output folder (created).
        derivation: provenance of the series.
        source_series_uid: SeriesInstanceUID of the source series.
        created: the series' creation time (default: now); one value for all its slices.
    """

    def __init__(
        self, folder: Path, derivation: Derivation, source_series_uid: str, created: datetime | None = None
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.derivation = derivation
        self.series_uid = derivation.uid("series", source_series_uid)
        created = created or datetime.now()
        self._date, self._time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
        self.slices = 0
        self.voxels = 0
        self.clipped = 0
        self._storage = ""

    def write(self, sources: Sequence[Dataset], hu: np.ndarray) -> list[Path]:
        """Write slices: ``sources`` (one template per slice, without pixel data), ``hu`` (n, y, x).

        Voxels that are padding in the source must hold their source HU in ``hu`` (they are
        then stored unchanged, as padding).

        Raises:
            InputError: a source slice is not a 16-bit, one-sample image or does not match ``hu``.
        """
        if len(sources) != len(hu):
            raise ValueError(f"{len(sources)} source dataset(s) for {len(hu)} slice(s)")
        paths = []
        for source, slice_hu in zip(sources, hu):
            path = self.folder / f"IM{self.slices:05d}.dcm"
            self._derive(source, slice_hu).save_as(path, enforce_file_format=True)
            paths.append(path)
            self.slices += 1
        return paths

    def _derive(self, source: Dataset, hu: np.ndarray) -> Dataset:
        if int(source.get("BitsAllocated", 0)) != 16 or int(source.get("SamplesPerPixel", 1)) != 1:
            raise InputError(
                f"series {source.get('SeriesInstanceUID')}: BitsAllocated {source.get('BitsAllocated')}, "
                f"SamplesPerPixel {source.get('SamplesPerPixel')}; a derived CT series needs 16-bit grey images"
            )
        if hu.shape != (source.Rows, source.Columns):
            raise ValueError(f"slice of shape {hu.shape} for a source of {source.Rows}x{source.Columns}")
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for keyword in _DROPPED:
            if keyword in ds:
                delattr(ds, keyword)
        self._set_identity(ds, source)
        self._set_pixels(ds, hu)
        correct_ambiguous_vr(ds, is_little_endian=True)  # "US or SS" elements of implicit-VR sources
        return ds

    def _set_identity(self, ds: Dataset, source: Dataset) -> None:
        derivation = self.derivation
        sop_uid = derivation.uid("instance", source.SOPInstanceUID)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = source.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationVersionName = f"N2GCT_{__version__}"[:16]
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.ImageType = DERIVED_IMAGE_TYPE
        ds.DerivationDescription = derivation.description
        ds.SourceImageSequence = [_source_reference(source)]
        ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
        ds.SeriesDescription = _series_description(source, derivation.method)
        ds.SoftwareVersions = _software_versions(source, derivation.software)
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = self._date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = self._time
        spacing = str(ds.get("SpacingBetweenSlices", "") or "").strip()
        if spacing.startswith("-"):
            ds.SpacingBetweenSlices = spacing[1:]

    def _set_pixels(self, ds: Dataset, hu: np.ndarray) -> None:
        signed = int(ds.PixelRepresentation) == 1
        value_range = stored_range(int(ds.BitsStored), signed)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        stored, clipped = hu_to_stored(hu, slope, intercept, value_range, np.dtype("<i2" if signed else "<u2"))
        low, high = (v * slope + intercept for v in value_range)
        self._storage = f"stored as round((HU - {intercept:g}) / {slope:g}) in [{low:g}, {high:g}] HU"
        self.clipped += clipped
        self.voxels += stored.size
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"


    def finish(self) -> None:
        """Log what was written: slices, storage, and how many voxels were clipped to the stored range."""
        share = self.clipped / self.voxels if self.voxels else 0.0
        log.info(
            "derived series %s: %d slice(s), %s (rounding error ≤ slope/2); %d voxel(s) (%.3f%%) clipped to that range",
            self.series_uid, self.slices, self._storage, self.clipped, 100 * share,
        )


def write_derived_series(volume: CTVolume, hu: np.ndarray, folder: Path, derivation: Derivation) -> DerivedSeriesWriter:
    """Write ``hu`` (z, y, x), processed from the DICOM ``volume``, as a derived series into ``folder``.

    Padding voxels of ``volume`` are written with their source values. Returns the writer (its
    ``series_uid``, ``slices``, ``clipped`` and ``voxels``).

    Raises:
        InputError: ``volume`` was not read from DICOM.
    """
    if not volume.datasets or volume.series_uid is None:
        raise InputError("a derived DICOM series needs a volume read from DICOM (its slices are the templates)")
    if volume.padding_mask is not None:
        hu = np.where(volume.padding_mask, volume.hu, hu)
    writer = DerivedSeriesWriter(folder, derivation, volume.series_uid)
    writer.write(volume.datasets, hu)
    writer.finish()
    return writer
