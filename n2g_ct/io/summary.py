"""What a path holds (``n2g-ct info``, as text or JSON); never shows patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from n2g_ct.errors import InputError
from n2g_ct.io.dicom import DicomSeries, read_dicom_series, scan_dicom_tree, visible_files
from n2g_ct.io.nifti import is_nifti, read_nifti
from n2g_ct.io.volume import CTVolume


def _volume_record(volume: CTVolume) -> dict[str, Any]:
    nz, ny, nx = volume.shape
    values = volume.hu if volume.padding_mask is None else volume.hu[~volume.padding_mask]
    return {
        "size_xy": [nx, ny],
        "slices": nz,
        "spacing_xyz_mm": [round(float(v), 4) for v in volume.spacing_xyz],
        "hu_range": [float(values.min()), float(values.max())] if values.size else None,
        "padding_share": None if volume.padding_mask is None else round(float(volume.padding_mask.mean()), 4),
    }


def _series_record(series: DicomSeries, allow_non_ct: bool, assume_identity_rescale: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "dicom series",
        "series_uid": series.series_uid,
        "folder": str(series.folder),
        "modality": series.modality,
        "transfer_syntax": series.transfer_syntax,
        "frames": len(series),
        "files": len(dict.fromkeys(series.paths)),
        "grid_problem": series.grid_problem,
        "error": None,
    }
    if series.modality != "CT" and not allow_non_ct:
        record["error"] = "not CT: not read (--allow-non-ct reads it)"
        return record
    try:
        volume = read_dicom_series(series, allow_non_ct=allow_non_ct, assume_identity_rescale=assume_identity_rescale)
    except InputError as exc:
        record["error"] = str(exc)
        return record
    return record | _volume_record(volume)


def describe_records(path: Path, *, allow_non_ct: bool = False, assume_identity_rescale: bool = False) -> dict[str, Any]:
    """What ``path`` holds: ``volumes`` (one record per DICOM series or NIfTI file: geometry, HU
    range, padding share, why it is not a regular grid), ``set_aside`` and ``damaged`` files with
    their reasons.

    Raises:
        InputError: nothing readable at ``path``.
    """
    path = Path(path)
    if path.is_file() and is_nifti(path):
        return {"volumes": [{"kind": "nifti", "path": str(path)} | _volume_record(read_nifti(path))],
                "set_aside": [], "damaged": []}
    nifti_files = [p for p in visible_files(path) if is_nifti(p)] if path.is_dir() else []
    volumes = [{"kind": "nifti", "path": str(p)} | _volume_record(read_nifti(p)) for p in nifti_files]
    scan = scan_dicom_tree(path, keep_datasets=True)  # pixels stay on disk until their series is decoded
    volumes += [_series_record(s, allow_non_ct, assume_identity_rescale) for s in scan.series]
    if not (volumes or scan.set_aside or scan.damaged):
        raise InputError(f"{path}: no DICOM file or NIfTI volume found")
    return {
        "volumes": volumes,
        "set_aside": [{"path": str(item.path), "reason": item.reason} for item in scan.set_aside],
        "damaged": [{"path": str(item.path), "reason": item.reason} for item in scan.damaged],
    }


def _render_volume(record: dict[str, Any]) -> list[str]:
    if record["kind"] == "nifti":
        lines = [f"NIfTI volume {record['path']}"]
    else:
        frames = f" ({record['frames']} frame(s) in {record['files']} file(s))" if record["files"] != record["frames"] else ""
        lines = [f"DICOM series {record['series_uid']}{frames}", f"  folder: {record['folder']}",
                 f"  modality {record['modality'] or '(none)'}, transfer syntax {record['transfer_syntax']}"]
        if record["error"] and record["modality"] != "CT":
            return lines + [f"  {record['frames']} slice(s), {record['error']}"]
        if record["error"]:
            return lines + [f"  not readable as a CT volume: {record['error']}"]
        if record["grid_problem"]:
            lines.append(f"  not a regular grid: {record['grid_problem']} (denoised slice by slice)")
    (nx, ny), (sx, sy, sz) = record["size_xy"], record["spacing_xyz_mm"]
    lines.append(f"  size {nx}x{ny}, {record['slices']} slice(s), spacing {sx:.3g} x {sy:.3g} x {sz:.3g} mm")
    low_high = record["hu_range"]
    lines.append("  HU range: (all padding)" if low_high is None else f"  HU range: {low_high[0]:.0f} .. {low_high[1]:.0f}")
    if record["padding_share"] is not None:
        lines.append(f"  padding: {record['padding_share']:.1%} of voxels (outside the field of view)")
    return lines


def describe_path(path: Path, *, allow_non_ct: bool = False, assume_identity_rescale: bool = False) -> str:
    """:func:`describe_records` as text: one block per series or NIfTI volume, then the files set
    aside (not CT image slices) and the damaged files, each with its reason.

    Raises:
        InputError: nothing readable at ``path``.
    """
    records = describe_records(path, allow_non_ct=allow_non_ct, assume_identity_rescale=assume_identity_rescale)
    blocks = ["\n".join(_render_volume(r)) for r in records["volumes"]]
    for title, key in (("set aside (not CT image slices)", "set_aside"), ("damaged", "damaged")):
        if records[key]:
            items = [f"  {item['path']}: {item['reason']}" for item in records[key]]
            blocks.append("\n".join([f"{len(items)} file(s) {title}:", *items]))
    return "\n\n".join(blocks)
