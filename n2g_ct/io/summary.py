"""Human-readable description of what a path holds (``n2g-ct info``); never shows patient data."""

from __future__ import annotations

from pathlib import Path


from n2g_ct.errors import InputError
from n2g_ct.io.dicom import DicomSeries, read_dicom_series, scan_dicom_tree
from n2g_ct.io.nifti import is_nifti, read_nifti
from n2g_ct.io.volume import CTVolume


def _hu_range(volume: CTVolume) -> str:
    values = volume.hu if volume.padding_mask is None else volume.hu[~volume.padding_mask]
    if values.size == 0:
        return "HU range: (all padding)"
    return f"HU range: {values.min():.0f} .. {values.max():.0f}"


def _geometry(volume: CTVolume) -> str:
    nz, ny, nx = volume.shape
    sx, sy, sz = volume.spacing_xyz
    return f"size {nx}x{ny}, {nz} slice(s), spacing {sx:.3g} x {sy:.3g} x {sz:.3g} mm"


def _describe_series(series: DicomSeries, allow_non_ct: bool, assume_identity_rescale: bool) -> list[str]:
    files = len(dict.fromkeys(series.paths))
    frames = f" ({len(series)} frame(s) in {files} file(s))" if files != len(series) else ""
    lines = [f"DICOM series {series.series_uid}{frames}", f"  folder: {series.folder}"]
    lines.append(f"  modality {series.modality or '(none)'}, transfer syntax {series.transfer_syntax}")
    if series.modality != "CT" and not allow_non_ct:
        return lines + [f"  {len(series)} slice(s), not CT: not read (--allow-non-ct reads it)"]
    if series.grid_problem:
        lines.append(f"  not a regular grid: {series.grid_problem} (denoised slice by slice)")
    try:
        volume = read_dicom_series(series, allow_non_ct=allow_non_ct, assume_identity_rescale=assume_identity_rescale)
    except InputError as exc:
        return lines + [f"  not readable as a CT volume: {exc}"]
    lines.append(f"  {_geometry(volume)}")
    lines.append(f"  {_hu_range(volume)}")
    if volume.padding_mask is not None:
        lines.append(f"  padding: {volume.padding_mask.mean():.1%} of voxels (outside the field of view)")
    return lines


def describe_path(path: Path, *, allow_non_ct: bool = False, assume_identity_rescale: bool = False) -> str:
    """One block of lines per series or NIfTI volume found at ``path``, then the files set aside
    (not CT image slices) and the damaged files, each with its reason.

    Raises:
        InputError: nothing readable at ``path``.
    """
    path = Path(path)
    if path.is_file() and is_nifti(path):
        volume = read_nifti(path)
        return "\n".join([f"NIfTI volume {path}", f"  {_geometry(volume)}", f"  {_hu_range(volume)}"])
    nifti_files = sorted(p for p in path.rglob("*") if is_nifti(p)) if path.is_dir() else []
    blocks = [
        "\n".join([f"NIfTI volume {p}", f"  {_geometry(v)}", f"  {_hu_range(v)}"])
        for p, v in ((p, read_nifti(p)) for p in nifti_files)
    ]
    scan = scan_dicom_tree(path, keep_datasets=True, read_pixels=True)
    blocks += ["\n".join(_describe_series(s, allow_non_ct, assume_identity_rescale)) for s in scan.series]
    for title, items in (("set aside (not CT image slices)", scan.set_aside), ("damaged", scan.damaged)):
        if items:
            blocks.append("\n".join([f"{len(items)} file(s) {title}:", *(f"  {item}" for item in items)]))
    if not blocks:
        raise InputError(f"{path}: no DICOM file or NIfTI volume found")
    return "\n\n".join(blocks)
