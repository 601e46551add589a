"""Read CT DICOM series: group by SeriesInstanceUID, sort along the slice normal, decode to HU.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the
two ImageOrientationPatient cosines), never by InstanceNumber. Compressed transfer syntaxes
(JPEG 2000, JPEG-LS, RLE, JPEG lossless) decode through pydicom's pixel handlers (pylibjpeg plugins).
Messages name files and series, never patient names or IDs.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from n2g_ct.errors import InputError
from n2g_ct.io.volume import CTVolume

log = logging.getLogger(__name__)

# Some scanners write private tags whose length does not fit their VR; read them as UN.
pydicom.config.convert_wrong_length_to_UN = True

# Largest relative deviation of one slice gap from the median gap before a series counts as
# having a missing slice (or an irregular stack, which one (z, y, x) array cannot represent).
_GAP_TOLERANCE = 0.1
# Orientation cosines closer than this count as the same orientation.
_ORIENTATION_TOLERANCE = 1e-4


@dataclass
class DicomSeries:
    """One series found on disk, from headers only (no pixel decoding).

    Attributes:
        series_uid: SeriesInstanceUID.
        paths: files in slice order (ascending position along the slice normal).
        positions_mm: (n,) position of each slice along the normal, ascending, mm.
        modality: Modality of the series (e.g. "CT").
        rows, columns: slice size in pixels.
        folder: the deepest folder holding all the files.
        transfer_syntax: name of the first slice's transfer syntax.
        datasets: the parsed files in ``paths`` order when the scan read whole files (pixel data
            included, not yet decoded), so that decoding does not parse them again; else None.
    """

    series_uid: str
    paths: list[Path]
    positions_mm: np.ndarray
    modality: str
    rows: int
    columns: int
    folder: Path
    transfer_syntax: str
    datasets: list[Dataset] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{root}: the folder is empty")
    return files


def _read_dataset(path: Path, with_pixels: bool) -> Dataset | None:
    """Parsed ``path`` (pixel data left encoded), or None when it is not a DICOM file at all."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=not with_pixels)
    except InvalidDicomError:
        return None
    except Exception as exc:  # truncated or corrupt: pydicom raises many types here
        log.warning("skipping %s: unreadable DICOM header (%s)", path, exc)
        return None


def _slice_geometry(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(orientation (6,), position (3,)) of one slice; InputError when either tag is missing."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], float)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: missing or invalid ImageOrientationPatient/ImagePositionPatient ({exc}); "
            "a slice without geometry cannot be placed in a volume"
        ) from None
    if orientation.shape != (6,) or position.shape != (3,):
        raise InputError(f"{path}: ImageOrientationPatient needs 6 values and ImagePositionPatient 3")
    return orientation, position


def _slice_normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _build_series(uid: str, items: list[tuple[Path, Dataset]], keep_datasets: bool) -> DicomSeries:
    """Check that the slices of one series stack into a volume and sort them along the normal."""
    sizes = defaultdict(list)
    for path, ds in items:
        sizes[(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))].append(path)
    if len(sizes) > 1:
        listing = "; ".join(f"{r}x{c}: {len(p)} file(s), e.g. {p[0]}" for (r, c), p in sizes.items())
        raise InputError(f"series {uid} mixes slice sizes ({listing}); it cannot form one volume")
    geometry = [(path, *_slice_geometry(ds, path)) for path, ds in items]
    reference = geometry[0][1]
    odd = [p for p, o, _ in geometry if np.abs(o - reference).max() > _ORIENTATION_TOLERANCE]
    if odd:
        raise InputError(
            f"series {uid} mixes slice orientations: {len(odd)} file(s) differ from {geometry[0][0]}, "
            f"e.g. {odd[0]}; it cannot form one volume"
        )
    normal = _slice_normal(reference)
    positions = np.asarray([pos @ normal for _, _, pos in geometry])
    order = np.argsort(positions, kind="stable")
    paths = [geometry[i][0] for i in order]
    positions = positions[order]
    first = items[order[0]][1]
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return DicomSeries(
        series_uid=uid,
        paths=paths,
        positions_mm=positions,
        modality=str(first.get("Modality", "")),
        rows=int(first.Rows),
        columns=int(first.Columns),
        folder=folder,
        transfer_syntax=_transfer_syntax_name(first),
        datasets=[items[i][1] for i in order] if keep_datasets else None,
    )


def _transfer_syntax_name(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown"


def scan_dicom(root: Path, *, with_pixels: bool = False) -> list[DicomSeries]:
    """Find every DICOM image series below ``root`` (a folder tree or a single file).

    Reads headers only, unless ``with_pixels`` keeps whole parsed files in the result for
    :func:`read_dicom_series` (one pass over the files instead of two).

    Non-DICOM files are ignored; files that look like DICOM but cannot be parsed are skipped with a
    warning naming them. Files without pixel data (e.g. DICOMDIR, structured reports) are left out.

    Raises:
        InputError: ``root`` is missing or empty, or no DICOM image is found below it, or a series
            mixes slice sizes or orientations.
    """
    root = Path(root)
    files = _list_files(root)
    headers = [_read_dataset(path, with_pixels) for path in files]
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    no_pixels = []
    for path, ds in zip(files, headers):
        if ds is None:
            continue
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:
            no_pixels.append(path)
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    if not groups:
        detail = f" ({len(no_pixels)} DICOM file(s) without image data, e.g. {no_pixels[0]})" if no_pixels else ""
        raise InputError(f"{root}: no DICOM image files found among {len(files)} file(s){detail}")
    series = [_build_series(uid, items, with_pixels) for uid, items in groups.items()]
    return sorted(series, key=lambda s: (str(s.folder), s.series_uid))


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


def _decode_slice(path: Path, ds: Dataset | None) -> tuple[Dataset, np.ndarray] | str:
    """(dataset without PixelData, stored pixel values (rows, columns)) or a reason it is unusable.

    ``ds`` is the already parsed file, or None to read ``path``.
    """
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            return f"unreadable ({exc})"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no pixel data (7FE0,0010)"
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated pixel data, missing codec, bad photometric
        return f"pixel data cannot be decoded ({exc})"
    if pixels.shape != (ds.Rows, ds.Columns):
        return f"pixel array has shape {pixels.shape}, expected one frame of {ds.Rows}x{ds.Columns}"
    del ds.PixelData
    return ds, pixels


def _to_hu(ds: Dataset, stored: np.ndarray, out: np.ndarray) -> None:
    """``out`` (float32) = stored × RescaleSlope + RescaleIntercept, in HU."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """True where the stored value is PixelPaddingValue (or within PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in ds:
        return None
    value = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        low, high = sorted((value, int(ds.PixelPaddingRangeLimit)))
        return (stored >= low) & (stored <= high)
    return stored == value


def check_slice_gaps(series: DicomSeries, positions: np.ndarray, skipped: list[str]) -> float:
    """Mean slice spacing in mm (as ITK computes it); InputError on a missing or duplicated slice."""
    if len(positions) < 2:
        return 1.0
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    if spacing <= 0 or np.any(gaps <= spacing * _GAP_TOLERANCE):
        k = int(np.argmin(gaps))
        raise InputError(
            f"series {series.series_uid} in {series.folder} has two slices at the same position "
            f"({series.paths[k].name} and {series.paths[k + 1].name}); is a series duplicated?"
        )
    irregular = np.abs(gaps - spacing) > _GAP_TOLERANCE * spacing
    if irregular.any():
        k = int(np.argmax(irregular))
        because = f" after skipping unusable file(s): {'; '.join(skipped)}" if skipped else ""
        raise InputError(
            f"series {series.series_uid} in {series.folder} is inconsistent{because}: slice gap of "
            f"{gaps[k]:.3g} mm between positions {positions[k]:.2f} and {positions[k + 1]:.2f} mm, "
            f"where the series spacing is {spacing:.3g} mm"
        )
    return float(positions[-1] - positions[0]) / (len(positions) - 1)


def read_dicom_series(series: DicomSeries, *, allow_non_ct: bool = False) -> CTVolume:
    """Decode one series (from :func:`scan_dicom`) into a float32 HU volume (z, y, x).

    Unusable slices (truncated, corrupt, no pixel data) are skipped with a warning naming them; the
    read is refused when that leaves a gap in the stack or no slice at all.

    Raises:
        InputError: non-CT modality (unless ``allow_non_ct``), no usable slice, or a gap.
    """
    if series.modality != "CT" and not allow_non_ct:
        raise InputError(
            f"series {series.series_uid} in {series.folder} has modality {series.modality or '(none)'}, "
            "not CT; n2g-ct models HU images (pass allow_non_ct / --allow-non-ct to read it anyway)"
        )
    parsed = series.datasets or [None] * len(series.paths)
    decoded = [_decode_slice(path, ds) for path, ds in zip(series.paths, parsed)]
    kept, skipped, skipped_paths = [], [], []
    for path, position, result in zip(series.paths, series.positions_mm, decoded):
        if isinstance(result, str):
            log.warning("skipping %s: %s", path, result)
            skipped.append(f"{path.name}: {result}")
            skipped_paths.append(path)
        else:
            kept.append((path, position, *result))
    if not kept:
        raise InputError(
            f"series {series.series_uid} in {series.folder}: no usable slice ({'; '.join(skipped[:3])}"
            f"{' ...' if len(skipped) > 3 else ''})"
        )
    positions = np.asarray([k[1] for k in kept])
    dz = check_slice_gaps(series, positions, skipped)
    first = kept[0][2]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    direction = np.stack([orientation[:3], orientation[3:], _slice_normal(orientation)], axis=1)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    hu = np.empty((len(kept), int(first.Rows), int(first.Columns)), np.float32)
    masks = []
    for k, (_, _, ds, stored) in enumerate(kept):
        _to_hu(ds, stored, hu[k])
        masks.append(_padding_mask(ds, stored))
    padding = None
    if any(m is not None for m in masks):
        padding = np.stack([m if m is not None else np.zeros(hu.shape[1:], bool) for m in masks])
    return CTVolume(
        hu=hu,
        spacing_xyz=(column_spacing, row_spacing, dz),
        origin_xyz=tuple(float(v) for v in first.ImagePositionPatient),
        direction=direction,
        padding_mask=padding,
        datasets=[k[2] for k in kept],
        source_paths=[k[0] for k in kept],
        skipped_paths=skipped_paths,
        series_uid=series.series_uid,
    )
