"""Write a derived DICOM series: processed HU slices, with their source slices' headers as templates.

Each derived slice keeps the source's Patient, Study, Frame of Reference,
equipment, geometry and window attributes, and gets

- a new SeriesInstanceUID and SOPInstanceUID (MediaStorageSOPInstanceUID matching), derived
  deterministically from the source UID, the checkpoint hash and the method version
  (:meth:`Derivation.uid`): a re-run makes the same UIDs, another model or version other ones;
- ImageType ``DERIVED\\SECONDARY`` + the source's further values (``AXIAL`` when it has none),
  a DerivationDescription naming software, method, precision, checkpoint hash and any repair, and
  a SourceImageSequence item pointing at its source slice;
- SeriesNumber + :data:`SERIES_NUMBER_OFFSET`, the SeriesDescription suffixed with the method;
- new series, content and instance-creation dates/times, and n2g-ct appended to SoftwareVersions;
- pixels in the source's stored representation (BitsAllocated/BitsStored/PixelRepresentation,
  RescaleSlope/Intercept): ``round((HU − intercept) / slope)``, clipped to the stored range, the
  clipped voxels counted; always uncompressed Explicit VR Little Endian, whatever the source's
  encoding (big endian, implicit VR, VR ``UN``, compressed), with a file meta built from scratch.

An Enhanced CT multi-frame source gives one derived multi-frame file: its functional groups
(per-frame geometry and rescale) are kept; ImageType and FrameType become ``DERIVED\\PRIMARY`` (the
only value 2 Enhanced CT allows).

Repairs, each named in the DerivationDescription: absent type 2 attributes (anonymisers drop
Manufacturer, KVP, StudyID, ...) are added empty; a missing FrameOfReferenceUID gets a UID derived
from the source study and series (one per source series, whatever the model); a missing SOP class
falls back to the file meta's, then to CT Image Storage; a PixelPaddingValue written unsigned for
signed pixels is written signed; a source SOPInstanceUID that is not a valid UID is not referenced.
Values present in the source (even invalid ones, such as dotted dates) are never changed.

Dropped: private tags (vendor data about the source pixels), Smallest/Largest pixel values, icon
images and the source's own derivation codes. A negative SpacingBetweenSlices (seen in real
scanners' files, invalid DICOM) is written as its magnitude.
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
from pydicom.uid import PYDICOM_ROOT_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from n2g_ct import __version__
from n2g_ct.errors import InputError
from n2g_ct.io.dicom import frame_rescale, image_type, is_multiframe, padding_value, signed_value, sop_class
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


@dataclass
class Clipping:
    """Voxels whose HU fell outside a stored range: below it (in CT, air outside the body: harmless)
    and above it (metal, dense bone: values lost), out of all voxels written."""

    below: int = 0
    above: int = 0
    voxels: int = 0

    def add(self, other: Clipping) -> None:
        self.below += other.below
        self.above += other.above
        self.voxels += other.voxels

    def describe(self, low_hu: float, high_hu: float) -> str:
        """One phrase, e.g. ``"12.1% below -1024 HU (air, harmless), 0 above 3071 HU"``."""

        def share(count: int) -> str:
            return f"{count} ({100 * count / self.voxels:.3g}%)" if count and self.voxels else "0"

        return (f"{share(self.below)} voxel(s) below {low_hu:g} HU (air outside the body: harmless), "
                f"{share(self.above)} above {high_hu:g} HU (values lost)")


def hu_to_stored(
    hu: np.ndarray, slope: float, intercept: float, value_range: tuple[int, int], dtype: np.dtype
) -> tuple[np.ndarray, Clipping]:
    """Stored values ``round((hu − intercept) / slope)`` clipped to ``value_range``, as ``dtype``.

    Rounding is to the nearest integer (ties to even), an error of at most ``slope / 2`` HU.

    Returns:
        (stored values, how many values were clipped below and above the range).
    """
    stored = np.rint((hu - np.float32(intercept)) / np.float32(slope))
    low, high = value_range
    clipping = Clipping(int(np.count_nonzero(stored < low)), int(np.count_nonzero(stored > high)), stored.size)
    return np.clip(stored, low, high).astype(dtype), clipping


def storage_formula(slope: float, intercept: float) -> str:
    """How HU become stored values, readable: ``stored = HU + 1024`` or ``stored = (HU - 5) / 0.5``."""
    shifted = "HU" if intercept == 0 else f"HU {'+' if intercept < 0 else '-'} {abs(intercept):g}"
    return f"stored = {shifted}" if slope == 1 else f"stored = ({shifted}) / {slope:g}"


def _series_description(source: Dataset, method: str) -> str:
    """The source's description + `` [n2g-ct METHOD]``, within LO's 64 characters: a cut never
    leaves an unclosed bracket (an earlier suffix is dropped whole)."""
    suffix = f" [n2g-ct {method}]"
    base = str(source.get("SeriesDescription", "") or "").strip() or "series"
    budget = _SERIES_DESCRIPTION_MAX - len(suffix)
    if len(base) > budget:
        base = base[:budget]
        if base.count("[") > base.count("]"):
            base = base[: base.rfind("[")]
        base = base.rstrip() or "series"
    return base + suffix


def _software_versions(source: Dataset, software: str) -> list[str]:
    """The source's SoftwareVersions (LO, VM 1-n) with ``software`` appended unless already there."""
    values = source.get("SoftwareVersions") or []
    values = [str(v) for v in ([values] if isinstance(values, str) else values)]
    return values if software in values else values + [software]


def _source_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _PURPOSE_OF_REFERENCE
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.SpatialLocationsPreserved = "YES"
    return item


# Type 2 (and 2C) attributes of the CT Image and Enhanced CT IODs a derived series may add empty
# when its source lacks them (anonymisers drop them): absent is invalid, empty is "unknown".
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer",
    "PositionReferenceIndicator", "InstanceNumber",
)
_TYPE2_CLASSIC = ("KVP", "AcquisitionNumber", "SliceThickness", "PatientOrientation")
# Clinical Trial Subject / Study / Series modules: (attributes that show the module is present,
# its type 2 attributes, added when it is).
_CLINICAL_TRIAL_MODULES = (
    (("ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID"),
     ("ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName")),
    (("ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription"), ("ClinicalTrialTimePointID",)),
    (("ClinicalTrialCoordinatingCenterName", "ClinicalTrialSeriesID", "ClinicalTrialSeriesDescription"),
     ("ClinicalTrialCoordinatingCenterName",)),
)
_MAX_UID_LENGTH = 64


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= _MAX_UID_LENGTH and UID(text).is_valid


def _rebuilt(source: Dataset) -> Dataset:
    """A copy of ``source`` without its private elements, made of decoded elements, free of the
    source's encoding: big endian, implicit VR and VR ``UN`` (resolved from the dictionary) all
    write back as explicit little endian."""
    copy_ = Dataset()
    for tag in list(source.keys()):
        if tag.is_private:  # vendor data about the source pixels: dropped, and never decoded
            continue
        element = copy.deepcopy(source[tag])  # indexing decodes a raw element (UN → dictionary VR)
        if element.VR == "SQ":
            element.value = [_rebuilt(item) for item in element.value]
        copy_.add(element)
    return copy_


class DerivedSeriesWriter:
    """Writes one derived series into ``folder``, slice by slice as the processed slices arrive.

    Files are named ``IM00000.dcm``, ``IM00001.dcm``, ... in the order written (callers write in
    slice order, ascending along the slice normal). A multi-frame source (Enhanced CT) gives one
    derived multi-frame file, written once all its frames have arrived. Counts the voxels clipped
    to the stored range.

    Args:
        folder: output folder (created with the first file).
        derivation: provenance of the series.
        source_series_uid: SeriesInstanceUID of the source series.
        created: the series' creation time (default: now); one value for all its slices.
    """

    def __init__(
        self, folder: Path, derivation: Derivation, source_series_uid: str, created: datetime | None = None
    ) -> None:
        self.folder = Path(folder)
        self.derivation = derivation
        self.source_series_uid = source_series_uid
        self.series_uid = derivation.uid("series", source_series_uid)
        created = created or datetime.now()
        self._date, self._time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
        self.slices = 0
        self.files = 0
        self.clipping = Clipping()
        self.repairs: list[str] = []
        self._storage = ""
        self._range_hu = (0.0, 0.0)
        self._pending: dict[str, tuple[Dataset, dict[int, np.ndarray]]] = {}

    def write(self, sources: Sequence[Dataset], hu: np.ndarray, frames: Sequence[int | None] | None = None) -> list[Path]:
        """Write slices: ``sources`` (one template per slice, without pixel data), ``hu`` (n, y, x),
        ``frames`` (per slice, its frame index in a multi-frame source; default: single-frame).

        Voxels that are padding in the source must hold their source HU in ``hu`` (they are
        then stored unchanged, as padding).

        Raises:
            InputError: a source slice is not a 16-bit, one-sample image or does not match ``hu``.
        """
        if len(sources) != len(hu):
            raise ValueError(f"{len(sources)} source dataset(s) for {len(hu)} slice(s)")
        paths = []
        for source, frame, slice_hu in zip(sources, frames or [None] * len(hu), hu):
            if frame is None:
                paths.append(self._save(self._derive(source, slice_hu[None], [None])))
                continue
            key = str(source.get("SOPInstanceUID") or getattr(source, "filename", "") or id(source))
            _, pending = self._pending.setdefault(key, (source, {}))  # frames of one file may come in several reads
            pending[frame] = slice_hu
            if len(pending) == int(source.get("NumberOfFrames", 1) or 1):
                del self._pending[key]
                order = sorted(pending)
                paths.append(self._save(self._derive(source, np.stack([pending[f] for f in order]), order)))
        return paths

    def check(self, source: Dataset, frame: int | None = None) -> None:
        """Build (not write) the derived header of ``source``: raises what writing it would raise."""
        self._derive(source, np.zeros((1, int(source.Rows), int(source.Columns)), np.float32), [frame], count=False)

    def _save(self, ds: Dataset) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"IM{self.files:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.files += 1
        return path

    def _derive(self, source: Dataset, hu: np.ndarray, frames: list[int | None], count: bool = True) -> Dataset:
        if int(source.get("BitsAllocated", 0)) != 16 or int(source.get("SamplesPerPixel", 1)) != 1:
            raise InputError(
                f"series {source.get('SeriesInstanceUID')}: BitsAllocated {source.get('BitsAllocated')}, "
                f"SamplesPerPixel {source.get('SamplesPerPixel')}; a derived CT series needs 16-bit grey images"
            )
        if hu.shape[1:] != (source.Rows, source.Columns):
            raise ValueError(f"slices of shape {hu.shape[1:]} for a source of {source.Rows}x{source.Columns}")
        ds = _rebuilt(source)
        for keyword in _DROPPED:
            if keyword in ds:
                delattr(ds, keyword)
        repairs = self._repair(ds, source)
        self._set_identity(ds, source, repairs)
        self.repairs = sorted(set(self.repairs) | set(repairs))
        self._set_pixels(ds, hu, frames, count)
        correct_ambiguous_vr(ds, is_little_endian=True)  # "US or SS" elements of implicit-VR sources
        if count:
            self.slices += len(hu)
        return ds

    def _repair(self, ds: Dataset, source: Dataset) -> list[str]:
        """Add what anonymisers and old scanners leave out and a derived series may supply."""
        repairs = []
        multiframe = is_multiframe(source)
        expected = _TYPE2 + (() if multiframe else _TYPE2_CLASSIC)
        for markers, type2 in _CLINICAL_TRIAL_MODULES:
            if any(k in ds for k in markers):
                expected += type2
        if not multiframe and not {"BodyPartExamined", "ImageLaterality"} & set(ds.dir()):
            expected += ("Laterality",)  # type 2C: required unless the body part is known to be unpaired
        missing = [k for k in expected if k not in ds]
        for keyword in missing:
            setattr(ds, keyword, None)
        if missing:
            repairs.append(f"empty type 2 {', '.join(missing)} added")
        if not _valid_uid(ds.get("FrameOfReferenceUID")):
            ds.FrameOfReferenceUID = generate_uid(UID_ROOT, entropy_srcs=[
                "frame-of-reference", str(source.get("StudyInstanceUID", "")), self.source_series_uid])
            repairs.append("FrameOfReferenceUID added")
        if not str(source.get("SeriesNumber", "") or "").strip():
            repairs.append("SeriesNumber added")
        if padding_value(source) is not None and int(source.get("PixelRepresentation", 0) or 0) == 1:
            signed = {k: signed_value(source, k) for k in ("PixelPaddingValue", "PixelPaddingRangeLimit") if k in source}
            if any(source[k].VR != "SS" or int(source[k].value) != v for k, v in signed.items()):
                for keyword, value in signed.items():
                    del ds[keyword]
                    ds.add_new(keyword, "SS", value)
                repairs.append("PixelPaddingValue written as signed")
        return repairs

    def _set_identity(self, ds: Dataset, source: Dataset, repairs: list[str]) -> None:
        derivation = self.derivation
        source_uid = str(source.get("SOPInstanceUID", "") or "").strip() or str(
            getattr(source, "file_meta", Dataset()).get("MediaStorageSOPInstanceUID", ""))
        sop_uid = derivation.uid("instance", source_uid or f"{self.source_series_uid}/{self.files}")
        sop_class_uid = sop_class(source) or UID(CTImageStorage)
        if not _valid_uid(source.get("SOPClassUID")):
            repairs.append("SOPClassUID restored")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationVersionName = f"N2GCT_{__version__}"[:16]
        ds.file_meta = meta
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.ImageType = _derived_image_type(source)
        if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
            _derive_frame_types(ds)
        if _valid_uid(source_uid):
            ds.SourceImageSequence = [_source_reference(sop_class_uid, source_uid)]
        else:
            repairs.append("source image not referenced (its SOPInstanceUID is not a valid UID)")
        ds.DerivationDescription = derivation.description + (f"; repaired: {'; '.join(repairs)}" if repairs else "")
        ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
        ds.SeriesDescription = _series_description(source, derivation.method)
        ds.SoftwareVersions = _software_versions(source, derivation.software)
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = self._date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = self._time
        spacing = str(ds.get("SpacingBetweenSlices", "") or "").strip()
        if spacing.startswith("-"):
            ds.SpacingBetweenSlices = spacing[1:]

    def _set_pixels(self, ds: Dataset, hu: np.ndarray, frames: list[int | None], count: bool) -> None:
        signed = int(ds.PixelRepresentation) == 1
        value_range = stored_range(int(ds.BitsStored), signed)
        dtype = np.dtype("<i2" if signed else "<u2")
        stored = np.empty(hu.shape, dtype)
        for k, frame in enumerate(frames):
            slope, intercept = frame_rescale(ds, frame, assume_identity=True)
            stored[k], clipping = hu_to_stored(hu[k], slope, intercept, value_range, dtype)
            self._range_hu = tuple(v * slope + intercept for v in value_range)
            self._storage = f"{storage_formula(slope, intercept)} (rounded), [{self._range_hu[0]:g}, {self._range_hu[1]:g}] HU"
            if count:
                self.clipping.add(clipping)
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"

    def finish(self) -> None:
        """Log what was written: slices, storage, repairs, and how many voxels were clipped to the stored range.

        Raises:
            ValueError: frames of a multi-frame source are still missing.
        """
        if self._pending:
            source, frames = next(iter(self._pending.values()))
            raise ValueError(f"{len(frames)} of {source.NumberOfFrames} frames of {source.SOPInstanceUID} written")
        log.info(
            "derived series %s: %d slice(s) in %d file(s), %s; %s%s",
            self.series_uid, self.slices, self.files, self._storage,
            self.clipping.describe(*self._range_hu) if self.files else "nothing written",
            f"; repaired: {'; '.join(self.repairs)}" if self.repairs else "",
        )


def _derived_image_type(source: Dataset) -> list[str]:
    """DERIVED\\SECONDARY + the source's further values (AXIAL for a classic image without them);
    DERIVED\\PRIMARY for Enhanced CT, whose value 2 is always PRIMARY."""
    values = image_type(source)
    if is_multiframe(source):
        return ["DERIVED", "PRIMARY", *(values[2:] or ["AXIAL", "NONE"])]
    return DERIVED_IMAGE_TYPE[:2] + (values[2:] or DERIVED_IMAGE_TYPE[2:])


def _derive_frame_types(ds: Dataset) -> None:
    """FrameType of every functional group DERIVED\\PRIMARY, as the derived ImageType."""
    groups = list(ds.get("SharedFunctionalGroupsSequence") or []) + list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    for group in groups:
        for item in group.get("CTImageFrameTypeSequence") or []:
            values = image_type(item, "FrameType")
            item.FrameType = ["DERIVED", "PRIMARY", *values[2:]]


def write_derived_series(volume: CTVolume, hu: np.ndarray, folder: Path, derivation: Derivation) -> DerivedSeriesWriter:
    """Write ``hu`` (z, y, x), processed from the DICOM ``volume``, as a derived series into ``folder``.

    Padding voxels of ``volume`` are written with their source values. Returns the writer (its
    ``series_uid``, ``slices``, ``files`` and ``clipping``).

    Raises:
        InputError: ``volume`` was not read from DICOM.
    """
    if not volume.datasets or volume.series_uid is None:
        raise InputError("a derived DICOM series needs a volume read from DICOM (its slices are the templates)")
    if volume.padding_mask is not None:
        hu = np.where(volume.padding_mask, volume.hu, hu)
    writer = DerivedSeriesWriter(folder, derivation, volume.series_uid)
    writer.write(volume.datasets, hu, volume.frames)
    writer.finish()
    return writer
