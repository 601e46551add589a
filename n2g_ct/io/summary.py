"""Human-readable description of what a path holds (``n2g-ct info``); never shows patient data."""

from __future__ import annotations

from pathlib import Path


from n2g_ct.errors import InputError
from n2g_ct.io.dicom import DicomSeries, read_dicom_series, scan_dicom
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


def _describe_series(series: DicomSeries, allow_non_ct: bool) -> list[str]:
    lines = [f"DICOM series {series.series_uid}", f"  folder: {series.folder}"]
    lines.append(f"  modality {series.modality or '(none)'}, transfer syntax {series.transfer_syntax}")
    try:
        volume = read_dicom_series(series, allow_non_ct=allow_non_ct)
    except InputError as exc:
        return lines + [f"  not readable as a CT volume: {exc}"]
    lines.append(f"  {_geometry(volume)}")
    lines.append(f"  {_hu_range(volume)}")
    if volume.padding_mask is not None:
        lines.append(f"  padding: {volume.padding_mask.mean():.1%} of voxels (outside the field of view)")
    if len(volume.source_paths) < len(series):
        lines.append(f"  {len(series) - len(volume.source_paths)} unusable file(s) skipped (see warnings)")
    return lines


def describe_path(path: Path, *, allow_non_ct: bool = False) -> str:
    """One block of lines per series or NIfTI volume found at ``path``.

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
    try:
        found = scan_dicom(path, with_pixels=True)
    except InputError:
        if not blocks:
            raise
        found = []
    blocks += ["\n".join(_describe_series(s, allow_non_ct)) for s in found]
    return "\n\n".join(blocks)
