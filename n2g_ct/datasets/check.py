"""Checking a manifest against the files: ``n2g-ct manifest check``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from n2g_ct.errors import InputError

if TYPE_CHECKING:
    from n2g_ct.io.dicom import DicomSeries

from n2g_ct.datasets.manifest import ROLES, ManifestSplit, SeriesUse, load_manifest
from n2g_ct.datasets.scan import nearest_index, text_table


@dataclass
class CheckReport:
    """Result of :func:`check_manifest`: a summary table per split and the problems found."""

    manifest: Path
    dataset: str
    root: Path
    sections: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def render(self) -> str:
        """Readable multi-line report."""
        lines = [f"manifest {self.manifest} (dataset {self.dataset}; root {self.root})", *self.sections]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append(f"OK: no problem found in {len(self.sections)} split(s)")
        return "\n".join(lines)


class _SeriesIndex:
    """Header scans of the DICOM series a manifest uses, each done once."""

    def __init__(self) -> None:
        self._scans: dict[Path, DicomSeries | InputError] = {}

    def get(self, series: Path) -> DicomSeries:
        """The :class:`~n2g_ct.io.dicom.DicomSeries` at ``series``; InputError when it cannot be read."""
        from n2g_ct.io.dicom import scan_dicom, select_one_series

        if series not in self._scans:
            try:
                self._scans[series] = select_one_series(series, scan_dicom(series))
            except InputError as exc:
                self._scans[series] = exc
        found = self._scans[series]
        if isinstance(found, InputError):
            raise found
        return found

    def count(self, use: SeriesUse) -> int | None:
        """Slices ``use`` selects; ``None`` when that needs a series that cannot be read or a NIfTI volume."""
        from n2g_ct.io.nifti import is_nifti

        if use.slices is not None:
            return len(use.slices)
        if is_nifti(use.series):
            return None
        try:
            return len(self.get(use.series).paths)
        except InputError:
            return None


def _use_problems(use: SeriesUse, index: _SeriesIndex, tolerance_mm: float) -> list[str]:
    """Missing series or files, and slice indices that no longer point at the recorded files/positions."""
    from n2g_ct.io.nifti import is_nifti

    if not use.series.exists():
        return [f"{use.role}: series {use.series} is missing"]
    if use.files is not None:
        missing = [f for f in use.files if not f.is_file()]
        if missing:
            return [f"{use.role}: {len(missing)} of {len(use.files)} listed file(s) of {use.series} are missing, "
                    f"e.g. {missing[0]}"]
    if use.slices is None or is_nifti(use.series):
        return []
    try:
        series = index.get(use.series)
    except InputError as exc:
        return [f"{use.role}: {exc}"]
    out_of_range = [i for i in use.slices if i >= len(series.paths)]
    if out_of_range:
        return [f"{use.role}: {use.series} has {len(series.paths)} slice(s) but the manifest uses index "
                f"{out_of_range[0]}"]
    problems = []
    if use.files is not None:
        stale = [(i, f) for i, f in zip(use.slices, use.files) if series.paths[i].resolve() != f.resolve()]
        if stale:
            i, f = stale[0]
            problems.append(f"{use.role}: {len(stale)} slice index(es) of {use.series} no longer point at the listed "
                            f"file (index {i} is {series.paths[i].name}, listed {f.name}); "
                            "were files added or removed?")
    if use.positions_mm is not None:
        off = [(i, z) for i, z in zip(use.slices, use.positions_mm) if abs(series.positions_mm[i] - z) > tolerance_mm]
        if off:
            i, z = off[0]
            problems.append(f"{use.role}: {len(off)} slice(s) of {use.series} are not at the listed position "
                            f"(index {i}: {series.positions_mm[i]:.2f} mm, listed {z:.2f} mm)")
    return problems


def _role_pairs(present: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Each unordered pair of the roles in ``present``, in ROLES order."""
    roles = [r for r in ROLES if r in present]
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            yield a, b


def _slice_overlaps(split: ManifestSplit) -> list[str]:
    """The same slice of the same series in two roles (``None`` = every slice)."""
    used: dict[Path, dict[str, set[int] | None]] = defaultdict(dict)
    for use in split.uses():
        current = used[use.series].setdefault(use.role, set())
        if use.slices is None:
            used[use.series][use.role] = None
        elif current is not None:
            current.update(use.slices)
    problems = []
    for series, roles in used.items():
        for a, b in _role_pairs(list(roles)):
            sa, sb = roles[a], roles[b]
            shared = "all" if sa is None or sb is None else len(sa & sb)
            if shared:
                problems.append(f"split {split.name}: {shared} slice(s) of {series} used as both {a} and {b}")
    return problems


def _position_overlaps(split: ManifestSplit, tolerance_mm: float) -> list[str]:
    """The same patient's slice position (within ``tolerance_mm``) in two roles."""
    positions: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for use in split.counted_uses():
        if use.patient is not None and use.positions_mm is not None:
            positions[use.patient][use.role].extend(use.positions_mm)
    problems = []
    for patient, roles in positions.items():
        for a, b in _role_pairs(list(roles)):
            za, zb = np.asarray(roles[a]), np.sort(np.asarray(roles[b]))
            close = np.abs(za - zb[nearest_index(zb, za)]) <= tolerance_mm
            if close.any():
                problems.append(f"split {split.name}: patient {patient}: {int(close.sum())} slice position(s) in "
                                f"both {a} and {b}, e.g. {za[close][0]:.2f} mm")
    return problems


def _patient_overlaps(split: ManifestSplit) -> list[str]:
    """For ``disjoint: patient`` splits: a patient in two roles, or an entry without a patient label."""
    unlabelled = [u.series for u in split.uses() if u.patient is None]
    if unlabelled:
        return [f"split {split.name}: disjoint: patient needs a 'patient' on every entry; {unlabelled[0]} has none"]
    by_role = {r: {str(u.patient) for u in split.uses() if u.role == r} for r in ROLES}
    return [f"split {split.name}: patient(s) {', '.join(sorted(by_role[a] & by_role[b]))} in both {a} and {b}"
            for a, b in _role_pairs(ROLES) if by_role[a] & by_role[b]]


def _sum(counts: Sequence[int | None]) -> int | None:
    return None if None in counts else sum(c for c in counts if c is not None)


def _split_section(split: ManifestSplit, index: _SeriesIndex) -> tuple[str, list[str]]:
    """Summary table (slices per patient and role, test in pairs; ``?`` = unknown) and count mismatches."""
    counts: dict[str, dict[str, list[int | None]]] = defaultdict(lambda: {r: [] for r in ROLES})
    for use in split.counted_uses():
        counts[use.label][use.role].append(index.count(use))
    totals = {r: _sum([n for row in counts.values() for n in row[r]]) for r in ROLES}
    rows = [(label, *(_sum(row[r]) for r in ROLES)) for label, row in counts.items()]
    rows.append(("total", *totals.values()))
    table = text_table(("patient/series", "noisy", "clean", "test pairs"),
                   [[("?" if v is None else v) for v in row] for row in rows])
    head = [f"split {split.name} (disjoint: {split.disjoint})", *([f"  {split.description}"] * bool(split.description))]
    problems = [f"split {split.name}: {r} has {totals[r]} {'pair' if r == 'test' else 'slice'}(s), "
                f"the manifest records {split.counts[r]}"
                for r in ROLES if split.counts and r in split.counts and totals[r] not in (None, split.counts[r])]
    return "\n".join([*head, *(f"  {note}" for note in split.notes), table]), problems


def check_manifest(manifest_path: Path | str, data_root: Path | str | None = None) -> CheckReport:
    """Validate a manifest against the data on disk.

    Checks every split: series and listed files exist; slice indices are in range and still point
    at the listed files and positions (DICOM headers are read); no slice of a series and no patient's
    slice position (within ``position_tolerance_mm``) serves two roles; ``disjoint: patient``
    splits share no patient between roles; role totals match the recorded ``counts``.

    Raises:
        InputError: the manifest itself cannot be parsed (everything else lands in the report).
    """
    manifest = load_manifest(manifest_path, data_root)
    report = CheckReport(manifest.path, manifest.dataset, manifest.root)
    index = _SeriesIndex()
    for split in manifest.splits.values():
        section, count_problems = _split_section(split, index)
        report.sections.append(section)
        tolerance = manifest.position_tolerance_mm
        for use in split.uses():
            report.problems += [f"split {split.name}: {p}" for p in _use_problems(use, index, tolerance)]
        report.problems += count_problems + _slice_overlaps(split) + _position_overlaps(split, tolerance)
        if split.disjoint == "patient":
            report.problems += _patient_overlaps(split)
    return report
