"""Read CT DICOM: find the image series below a path, and decode them frame by frame to HU.

What the scan accepts, as scanners, anonymisers and PACS exports write it:

- files with or without the 128-byte preamble and file meta (bare datasets are read as the
  encoding they are written in); any transfer syntax pydicom decodes, with the pylibjpeg plugins for
  JPEG 2000, JPEG-LS, JPEG lossless and RLE; VR ``UN`` resolved from the data dictionary;
- classic CT images (one frame per file) and Enhanced CT multi-frame files (geometry and rescale
  from their functional groups): every frame is one slice;
- series of any geometry: irregular spacing, gaps, duplicated positions (kept as two slices) and
  gantry tilt. A 2-D denoiser needs no regular grid; :attr:`DicomSeries.grid_problem` says why a
  series is not one, for the consumers that need a grid.

What it sets aside, each with a one-line reason (:class:`DicomScan`): files that are not DICOM,
DICOMDIR indexes, localizers/scouts, images without standard Pixel Data or without patient geometry
(secondary captures); and *damaged* files (empty, truncated, unparsable), which fail the series of
their folder by name: a series is never read shorter than it is on disk.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the
ImageOrientationPatient cosines), never by InstanceNumber. HU = stored × RescaleSlope +
RescaleIntercept; a CT image without them (or with slope 0) is an error naming the file unless the
caller assumes the identity rescale. Messages name files and series, never patient data.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from n2g_ct.errors import InputError
from n2g_ct.io.volume import CTVolume

log = logging.getLogger(__name__)

# Some scanners write private tags whose length does not fit their VR; read them as UN.
pydicom.config.convert_wrong_length_to_UN = True

# A gap differing from the median gap by more than this share makes the spacing irregular; a gap
# below it (relative to the median) is a duplicated position.
_GAP_TOLERANCE = 0.1
# Orientation cosines closer than this count as the same orientation.
_ORIENTATION_TOLERANCE = 1e-4
# A slice normal further than this from the stacking direction is a tilted (sheared) stack.
_TILT_TOLERANCE_DEG = 0.5
# Values larger than this many bytes stay on disk during the header scan (pixel data, big blobs).
_DEFER_BYTES = 4096
# Suffixes under which an empty or unparsable file is taken for a damaged DICOM file (as are
# numbered names without a suffix, e.g. 6154 or IM0001; README or DONE are not).
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima", ".ct"}
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class SetAside:
    """A file the scan did not take as a slice of a CT series, and why (one line)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DicomSeries:
    """One series found on disk, from headers only (pixels decoded later).

    Attributes:
        series_uid: SeriesInstanceUID.
        paths: the file of each slice, in slice order (ascending position along the slice normal);
            a multi-frame file appears once per frame.
        positions_mm: (n,) position of each slice along the first slice's normal, ascending, mm.
        modality: Modality of the series (e.g. "CT").
        rows, columns: slice size in pixels.
        folder: the deepest folder holding all the files.
        transfer_syntax: name of the first file's transfer syntax.
        frames: per slice, its frame index in a multi-frame file, or None for a single-frame file.
        grid_problem: why the slices do not form a regular grid (irregular spacing, duplicated
            positions, tilt, mixed orientations), or None when they do.
        damaged: damaged files of the series' folder; reading the series fails while there are any.
        datasets: the parsed files in ``paths`` order (pixel data deferred) when the scan kept them.
    """

    series_uid: str
    paths: list[Path]
    positions_mm: np.ndarray
    modality: str
    rows: int
    columns: int
    folder: Path
    transfer_syntax: str
    frames: list[int | None] = field(default_factory=list)
    grid_problem: str | None = None
    damaged: list[SetAside] = field(default_factory=list)
    datasets: list[Dataset] | None = None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DicomScan:
    """Everything a scan found: CT image series, files set aside (with reasons), damaged files."""

    series: list[DicomSeries]
    set_aside: list[SetAside]
    damaged: list[SetAside]


# --------------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------------


def visible_files(root: Path) -> list[Path]:
    """Every file below the folder ``root``, sorted, outside hidden files and folders (the staging
    folders of running or killed jobs, temp files): those are never data.

    Raises:
        InputError: a folder below ``root`` cannot be listed (its files would be missed silently).
    """

    def refuse(exc: OSError) -> None:
        raise InputError(f"{exc.filename}: {exc.strerror} (the folder cannot be listed)")

    files = []
    for folder, subfolders, names in os.walk(root, onerror=refuse):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [Path(folder) / n for n in names if not n.startswith(".") and (Path(folder) / n).is_file()]
    return sorted(files)


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    files = visible_files(root)
    if not files:
        raise InputError(f"{root}: the folder is empty")
    return files


def _looks_like_dicom_name(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in _DICOM_SUFFIXES or suffix[1:].isdigit() or (not suffix and any(c.isdigit() for c in path.name))


def image_type(ds: Dataset, keyword: str = "ImageType") -> list[str]:
    """The values of a multi-valued CS element (ImageType, FrameType) as upper-case strings; a
    single value written as a plain string is one value, not its characters."""
    values = ds.get(keyword) or []
    return [str(v).upper() for v in ([values] if isinstance(values, str) else values)]


def _set_transfer_syntax(ds: Dataset) -> None:
    """Give a bare dataset (no file meta) the transfer syntax it was read with, for decoding."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def read_dicom_file(path: Path, defer: bool = True) -> Dataset | SetAside | None:
    """``path`` parsed (with ``defer``, values over a few kB such as pixel data stay on disk until
    used); None when it is not DICOM at all; a :class:`SetAside` when it is a damaged DICOM file
    (the reason says how)."""
    defer_size = _DEFER_BYTES if defer else None
    try:
        size = path.stat().st_size
        if size == 0:
            return SetAside(path, "empty file (0 bytes)") if _looks_like_dicom_name(path) else None
        try:
            ds = pydicom.dcmread(path, defer_size=defer_size)
        except InvalidDicomError:  # no preamble / no file meta: a bare dataset, or not DICOM at all
            ds = pydicom.dcmread(path, defer_size=defer_size, force=True)
            if not ("SOPClassUID" in ds or ("Modality" in ds and "Rows" in ds)):
                return SetAside(path, "not a readable DICOM file") if size < 132 and _looks_like_dicom_name(path) else None
        _set_transfer_syntax(ds)
        return ds
    except PermissionError:
        return SetAside(path, "permission denied")
    except Exception as exc:  # truncated or corrupt: pydicom raises many types here
        if not _looks_like_dicom_name(path) and not pydicom.misc.is_dicom(path):
            return None
        return SetAside(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})")


def sop_class(ds: Dataset) -> UID | None:
    """The SOP class: SOPClassUID, else the file meta's MediaStorageSOPClassUID, else None."""
    for value in (ds.get("SOPClassUID"), getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")):
        if value and str(value).strip():
            return UID(str(value).strip())
    return None


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def is_multiframe(ds: Dataset) -> bool:
    """True for a file whose frames carry their own geometry (Enhanced CT and other multi-frame IODs)."""
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _frame_item(ds: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """The item of functional-group ``sequence`` for ``frame``: per-frame first, then shared."""
    if frame is None:
        return None
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def frame_value(ds: Dataset, frame: int | None, sequence: str, keyword: str):
    """``keyword`` of one frame: from its functional group ``sequence`` in a multi-frame file, else
    from the dataset itself; None when absent."""
    item = _frame_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def frame_geometry(ds: Dataset, frame: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(orientation (6,), position (3,)) of one frame, or None when either is missing or invalid."""
    try:
        orientation = np.asarray(
            [float(v) for v in frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")], float)
        position = np.asarray(
            [float(v) for v in frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")], float)
    except (TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,) or not np.isfinite([*orientation, *position]).all():
        return None
    return orientation, position


def frame_rescale(ds: Dataset, frame: int | None, path: Path | None = None,
                  assume_identity: bool = False) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of one frame.

    Raises:
        InputError: missing on a CT image (unless ``assume_identity``), slope 0 or not finite.
    """
    slope = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        if assume_identity or str(ds.get("Modality", "")) != "CT":
            return 1.0, 0.0
        raise InputError(
            f"{path or 'a DICOM file'}: CT image without RescaleSlope/RescaleIntercept; its HU are unknown "
            "(--assume-identity-rescale reads stored values as HU)"
        )
    try:
        slope, intercept = float(slope), float(intercept)
    except (TypeError, ValueError):
        raise InputError(f"{path or 'a DICOM file'}: RescaleSlope {slope!r} / RescaleIntercept {intercept!r} are not numbers") from None
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise InputError(f"{path or 'a DICOM file'}: RescaleSlope {slope:g}, RescaleIntercept {intercept:g}; HU cannot be computed")
    return slope, intercept


def _is_localizer(ds: Dataset) -> bool:
    kinds = image_type(ds)
    if is_multiframe(ds):
        item = _frame_item(ds, 0, "CTImageFrameTypeSequence")
        kinds += image_type(item, "FrameType") if item is not None else []
    return "LOCALIZER" in kinds


# --------------------------------------------------------------------------------------------------
# Grouping files into series
# --------------------------------------------------------------------------------------------------


def _slice_normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _grid_problem(orientations: np.ndarray, positions_lps: np.ndarray, along: np.ndarray, names: list[str]) -> str | None:
    """Why slices with these orientations / LPS positions (sorted by ``along``) are not a regular grid."""
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        return "mixed slice orientations"
    if len(along) < 2:
        return None
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    duplicated = np.flatnonzero(gaps <= max(spacing, 0.0) * _GAP_TOLERANCE)
    if spacing <= 0 or duplicated.size:
        k = int(duplicated[0]) if duplicated.size else 0
        return (f"{duplicated.size or len(gaps)} duplicated position(s), e.g. {names[k]} and {names[k + 1]} "
                f"at {along[k]:.2f} mm")
    irregular = np.abs(gaps - spacing) > _GAP_TOLERANCE * spacing
    if irregular.any():
        return f"irregular slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm (median {spacing:.3g} mm)"
    stacking = positions_lps[-1] - positions_lps[0]
    normal = _slice_normal(orientations[0])
    cosine = abs(float(stacking @ normal)) / max(float(np.linalg.norm(stacking)), 1e-9)
    tilt = float(np.degrees(np.arccos(min(cosine, 1.0))))
    if tilt > _TILT_TOLERANCE_DEG:
        return f"gantry tilt {tilt:.1f}° (the slices are sheared against the slice normal)"
    return None


def _build_series(uid: str, frames: list[tuple[Path, int | None, Dataset, np.ndarray, np.ndarray]],
                  keep_datasets: bool) -> DicomSeries:
    """Sort the frames of one series along the normal; InputError when they mix slice sizes."""
    sizes = defaultdict(list)
    for path, _, ds, _, _ in frames:
        sizes[(int(ds.Rows), int(ds.Columns))].append(path)
    if len(sizes) > 1:
        listing = "; ".join(f"{r}x{c}: {len(p)} slice(s), e.g. {p[0]}" for (r, c), p in sizes.items())
        raise InputError(f"series {uid} mixes slice sizes ({listing}); split it into one folder per size")
    normal = _slice_normal(frames[0][3])
    along = np.asarray([position @ normal for *_, position in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    paths = [f[0] for f in frames]
    first = frames[0][2]
    names = [p.name if f is None else f"{p.name} frame {f + 1}" for p, f, *_ in frames]
    return DicomSeries(
        series_uid=uid,
        paths=paths,
        positions_mm=along,
        modality=str(first.get("Modality", "")),
        rows=int(first.Rows),
        columns=int(first.Columns),
        folder=Path(os.path.commonpath([str(p.parent) for p in paths])),
        transfer_syntax=_transfer_syntax_name(first),
        frames=[f[1] for f in frames],
        grid_problem=_grid_problem(np.stack([f[3] for f in frames]), np.stack([f[4] for f in frames]), along, names),
        datasets=[f[2] for f in frames] if keep_datasets else None,
    )


def _transfer_syntax_name(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown"


def _sort_file(path: Path, ds: Dataset, include_localizers: bool, members: dict, set_aside: list, damaged: list) -> None:
    """File one parsed DICOM file: as frames of its series (``members``), set aside or damaged."""
    sop = sop_class(ds)
    if sop == _MEDIA_STORAGE_DIRECTORY:
        set_aside.append(SetAside(path, "DICOMDIR (an index of the media; its images are read from their own files)"))
        return
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if "Rows" not in ds or not uid:
        image = sop is not None and sop.is_valid and "Image Storage" in (sop.name or "")
        if image or sop is None:
            damaged.append(SetAside(path, "incomplete header (no Rows or SeriesInstanceUID): truncated?"))
        else:
            set_aside.append(SetAside(path, f"{sop.name or sop}: not an image"))
        return
    if not include_localizers and _is_localizer(ds):
        set_aside.append(SetAside(path, "localizer/scout (ImageType LOCALIZER), not an axial slice"))
        return
    frame_count = int(ds.get("NumberOfFrames", 1) or 1) if is_multiframe(ds) else 1
    indices = list(range(frame_count)) if is_multiframe(ds) else [None]
    members[uid].append((path, ds, indices))


def _series_from_members(uid: str, files: list[tuple[Path, Dataset, list]], keep: bool,
                         set_aside: list, damaged: list) -> DicomSeries | None:
    """The series of one SeriesInstanceUID's files; files without pixels or geometry go to
    ``set_aside`` when no file of the series has them, else to ``damaged``; a second copy of one
    SOP instance is set aside (its derived image would have the same UID)."""
    frames, lacking = [], []
    first_copy: dict[str, Path] = {}
    for path, ds, indices in files:
        instance = str(ds.get("SOPInstanceUID", "") or "").strip()
        if instance in first_copy:  # one instance stored twice (e.g. in two transfer syntaxes)
            set_aside.append(SetAside(path, f"another copy of SOP instance {instance} (read from {first_copy[instance]})"))
            continue
        if instance:
            first_copy[instance] = path
        if not _has_pixels(ds):
            lacking.append((path, "no standard Pixel Data (7FE0,0010): the image is missing or only in a private element"))
            continue
        geometry = [frame_geometry(ds, i) for i in indices]
        if any(g is None for g in geometry):
            what = sop_class(ds)
            lacking.append((path, f"modality {ds.get('Modality') or '(none)'}"
                            + (f", {what.name}" if what is not None and what.name else "")
                            + ", no patient geometry (ImagePositionPatient/ImageOrientationPatient): not an axial CT slice"))
            continue
        frames += [(path, i, ds, o, p) for i, (o, p) in zip(indices, geometry)]
    if not frames:
        set_aside.extend(SetAside(p, r) for p, r in lacking)
        return None
    damaged.extend(SetAside(p, f"{r}, while the other files of series {uid} have it") for p, r in lacking)
    return _build_series(uid, frames, keep)


def scan_dicom_tree(root: Path, *, keep_datasets: bool = False, read_pixels: bool = False,
                    include_localizers: bool = False) -> DicomScan:
    """Find every CT image series below ``root`` (a folder tree or a single file), from headers.

    Damaged files are attached to the series in their folder (``DicomSeries.damaged``) and also
    listed in the result; files that are not slices of an image series are listed as set aside.

    Args:
        keep_datasets: keep the parsed files so that reading does not parse them again.
        read_pixels: read the pixel data too (one pass over the files when the series will be
            decoded anyway); otherwise it stays on disk until decoded.
        include_localizers: take localizers/scouts as slices too.

    Raises:
        InputError: ``root`` is missing, empty or cannot be listed; a series mixes slice sizes.
    """
    root = Path(root)
    members: dict[str, list] = defaultdict(list)
    set_aside: list[SetAside] = []
    damaged: list[SetAside] = []
    for path in _list_files(root):
        parsed = read_dicom_file(path, defer=not read_pixels)
        if isinstance(parsed, SetAside):
            damaged.append(parsed)
        elif parsed is not None:
            _sort_file(path, parsed, include_localizers, members, set_aside, damaged)
    series = [s for uid, files in members.items()
              if (s := _series_from_members(uid, files, keep_datasets, set_aside, damaged)) is not None]
    for s in series:
        folders = {s.folder, *(p.parent for p in s.paths)}
        s.damaged = [d for d in damaged if d.path.parent in folders]
    return DicomScan(sorted(series, key=lambda s: (str(s.folder), s.series_uid)), set_aside, damaged)


def scan_dicom(root: Path, *, with_pixels: bool = False, include_localizers: bool = False) -> list[DicomSeries]:
    """The CT image series below ``root`` (see :func:`scan_dicom_tree`); InputError when there is none.

    ``with_pixels`` keeps the parsed files for :func:`read_dicom_series` (one parse instead of two).
    """
    found = scan_dicom_tree(root, keep_datasets=with_pixels, read_pixels=with_pixels,
                            include_localizers=include_localizers)
    if not found.series:
        others = found.damaged + found.set_aside
        detail = f": {others[0]}" + (f" (and {len(others) - 1} more)" if len(others) > 1 else "") if others else ""
        raise InputError(f"{root}: no DICOM image series found{detail}")
    return found.series


def select_one_series(root: Path, series: list[DicomSeries], series_uid: str | None = None) -> DicomSeries:
    """The single series a caller asked for; InputError listing them when the choice is ambiguous."""
    if series_uid is not None:
        matches = [s for s in series if s.series_uid == series_uid]
        if not matches:
            raise InputError(f"{root}: no series with SeriesInstanceUID {series_uid}")
        return matches[0]
    if len(series) > 1:
        listing = "\n".join(
            f"  - {s.series_uid}: {len(s)} slice(s), {s.modality or 'no modality'}, in {s.folder}" for s in series
        )
        raise InputError(
            f"{root}: holds {len(series)} series where one was expected; pass one series folder "
            f"or a series UID:\n{listing}"
        )
    return series[0]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _decode_file(path: Path, ds: Dataset | None) -> tuple[Dataset, np.ndarray]:
    """(dataset without pixel data, stored values (frames, rows, columns)); InputError naming the file."""
    try:
        if ds is None:
            parsed = read_dicom_file(path)
            if not isinstance(parsed, Dataset):
                raise InputError(f"{path}: {parsed.reason if parsed else 'not a DICOM file'}")
            ds = parsed
        pixels = ds.pixel_array
    except InputError:
        raise
    except Exception as exc:  # truncated pixel data, missing codec, bad photometric
        raise InputError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.shape != (frames, ds.Rows, ds.Columns):
        pixels = pixels.reshape(-1, *pixels.shape[-2:]) if pixels.ndim in (2, 3) else pixels
    if pixels.shape != (frames, ds.Rows, ds.Columns):
        raise InputError(f"{path}: pixel array of shape {pixels.shape}, expected {frames} frame(s) of {ds.Rows}x{ds.Columns}")
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds, pixels


def signed_value(ds: Dataset, keyword: str) -> int:
    """A pixel-valued element (PixelPaddingValue, ...) in the pixels' signedness: written as US
    although the pixels are signed, 63536 is −2000."""
    value, bits = int(ds[keyword].value), int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def padding_value(ds: Dataset) -> tuple[int, int] | None:
    """(low, high) stored padding values (PixelPaddingValue to PixelPaddingRangeLimit), or None."""
    if "PixelPaddingValue" not in ds:
        return None
    value = signed_value(ds, "PixelPaddingValue")
    limit = signed_value(ds, "PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in ds else value
    return min(value, limit), max(value, limit)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """True where the stored value is the padding value (or within PixelPaddingRangeLimit)."""
    padding = padding_value(ds)
    if padding is None:
        return None
    low, high = padding
    return (stored >= low) & (stored <= high)


def read_dicom_series(series: DicomSeries, *, allow_non_ct: bool = False, assume_identity_rescale: bool = False) -> CTVolume:
    """Decode one series (from :func:`scan_dicom`) into a float32 HU volume (z, y, x).

    The volume's slices are the series' frames in order, whatever the spacing; ``spacing_xyz[2]`` is
    the mean gap and ``grid_problem`` says when the slices are not a regular grid.

    Raises:
        InputError: non-CT modality (unless ``allow_non_ct``), a damaged file in the series, a file
            that cannot be decoded, or a CT image without a usable rescale (each naming the file).
    """
    if series.modality != "CT" and not allow_non_ct:
        raise InputError(
            f"series {series.series_uid} in {series.folder} has modality {series.modality or '(none)'}, "
            "not CT; n2g-ct models HU images (pass allow_non_ct / --allow-non-ct to read it anyway)"
        )
    if series.damaged:
        raise InputError(f"series {series.series_uid} in {series.folder}: damaged file {series.damaged[0]}"
                         + (f" (and {len(series.damaged) - 1} more)" if len(series.damaged) > 1 else ""))
    parsed = series.datasets or [None] * len(series.paths)
    decoded: dict[Path, tuple[Dataset, np.ndarray]] = {}
    hu = np.empty((len(series), series.rows, series.columns), np.float32)
    masks, templates, lps = [], [], []
    for k, (path, frame, ds) in enumerate(zip(series.paths, series.frames or [None] * len(series), parsed)):
        if path not in decoded:
            decoded[path] = _decode_file(path, ds)
        template, stored = decoded[path]
        slope, intercept = frame_rescale(template, frame, path, assume_identity_rescale)
        hu[k] = stored[frame or 0]
        if slope != 1.0:
            hu[k] *= np.float32(slope)
        if intercept != 0.0:
            hu[k] += np.float32(intercept)
        masks.append(_padding_mask(template, stored[frame or 0]))
        templates.append(template)
        lps.append(frame_geometry(template, frame)[1])
    first, frame0 = templates[0], (series.frames or [None])[0]
    orientation, _ = frame_geometry(first, frame0)
    direction = np.stack([orientation[:3], orientation[3:], _slice_normal(orientation)], axis=1)
    spacing = frame_value(first, frame0, "PixelMeasuresSequence", "PixelSpacing") or [1.0, 1.0]
    row_spacing, column_spacing = (float(v) for v in spacing)
    along = series.positions_mm
    dz = float(along[-1] - along[0]) / (len(along) - 1) if len(along) > 1 and along[-1] > along[0] else 1.0
    padding = None
    if any(m is not None for m in masks):
        padding = np.stack([m if m is not None else np.zeros(hu.shape[1:], bool) for m in masks])
    return CTVolume(
        hu=hu,
        spacing_xyz=(column_spacing, row_spacing, dz),
        origin_xyz=tuple(float(v) for v in lps[0]),
        direction=direction,
        padding_mask=padding,
        datasets=templates,
        frames=list(series.frames or [None] * len(series)),
        source_paths=list(series.paths),
        slice_positions_lps=np.asarray(lps, float),
        grid_problem=series.grid_problem,
        series_uid=series.series_uid,
    )
