"""Scanning a dataset tree with its definition into a concrete manifest (every slice listed with its
file and position): ``n2g-ct manifest scan``."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from n2g_ct import __version__
from n2g_ct.atomic import write_text_atomic
from n2g_ct.errors import ConfigError, InputError

if TYPE_CHECKING:
    pass

from n2g_ct.datasets.definition import DatasetDefinition, PatientRule, RandomPositionsRule, load_definition
from n2g_ct.datasets.manifest import MANIFEST_VERSION, ROLES
from n2g_ct.datasets.yaml_fields import YAML_DUMPER

log = logging.getLogger(__name__)



def nearest_index(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index into ascending, non-empty ``sorted_values`` of the value nearest to each query."""
    if len(sorted_values) == 1:
        return np.zeros(len(queries), int)
    idx = np.searchsorted(sorted_values, queries).clip(1, len(sorted_values) - 1)
    left_closer = queries - sorted_values[idx - 1] <= sorted_values[idx] - queries
    return idx - left_closer.astype(int)


def pair_positions(low_mm: np.ndarray, ref_mm: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """(k, 2) index pairs (low, reference) of slices at the same position, ascending.

    Two slices pair when each is the other's nearest and they lie within ``tolerance_mm`` along
    the slice normal, so every slice pairs at most once. Inputs are ascending positions (mm).
    """
    to_ref = nearest_index(ref_mm, low_mm)
    to_low = nearest_index(low_mm, ref_mm)
    low_idx = np.arange(len(low_mm))
    keep = (np.abs(low_mm - ref_mm[to_ref]) <= tolerance_mm) & (to_low[to_ref] == low_idx)
    return np.stack([low_idx[keep], to_ref[keep]], axis=1)


@dataclass(frozen=True)
class _ScannedSeries:
    folder: str  # relative to the root, POSIX
    files: tuple[str, ...]  # relative to the root, in position order
    positions_mm: np.ndarray  # ascending


@dataclass(frozen=True)
class _Patient:
    code: str
    low: _ScannedSeries
    ref: _ScannedSeries
    pairs: np.ndarray  # (k, 2) indices (low, ref), ascending

    def unpaired_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions (mm) of the low-dose and of the reference slices without a partner."""
        out = []
        for column, series in enumerate((self.low, self.ref)):
            mask = np.ones(len(series.positions_mm), bool)
            mask[self.pairs[:, column]] = False
            out.append(series.positions_mm[mask])
        return out[0], out[1]


def detect_layout(definition: DatasetDefinition, root: Path) -> str:
    """The name of the one layout of ``definition`` found under ``root``.

    A layout is found when at least one of its split-resolution series folders exists.

    Raises:
        InputError: no layout or several layouts found, or a patient misses a dose (all listed).
    """
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    res = definition.split_resolution
    folders = {name: [(p, d, root / definition.folder(name, p, d, res)) for p in definition.patients
                      for d in definition.doses] for name in definition.layouts}
    found = [name for name, items in folders.items() if any(f.is_dir() for _, _, f in items)]
    if not found:
        expected = " or ".join(f"{items[0][2]} ({name})" for name, items in folders.items())
        entries = sorted(p.name for p in root.iterdir())[:10]
        raise InputError(f"{root}: no {definition.name} layout found; expected e.g. {expected}; "
                         f"the folder holds: {', '.join(entries) or 'nothing'}")
    if len(found) > 1:
        raise InputError(f"{root}: holds several {definition.name} layouts ({', '.join(found)}); point --root at one")
    missing = [f"{p} has no {d.name}-dose {res} series ({f})" for p, d, f in folders[found[0]] if not f.is_dir()]
    if missing:
        raise InputError(f"{root} (layout {found[0]}): " + "; ".join(missing))
    return found[0]


def _scan_series(root: Path, folder: Path) -> _ScannedSeries:
    from n2g_ct.io.dicom import scan_dicom, select_one_series

    series = select_one_series(root / folder, scan_dicom(root / folder))
    return _ScannedSeries(folder.as_posix(), tuple(p.relative_to(root).as_posix() for p in series.paths),
                          np.asarray(series.positions_mm, float))


def paper_counts(n_pairs: int, rule: RandomPositionsRule) -> tuple[tuple[int, int, int], str | None]:
    """(test, noisy, clean) counts for ``n_pairs`` paired positions, and a note when not all are used as asked.

    With at least ``test + noisy + clean`` paired positions the rule's counts are used (extra
    positions stay unused). With fewer, each count is scaled by ``n_pairs / (test + noisy + clean)``
    and rounded down, at least 1 each.

    Raises:
        InputError: fewer than 3 paired positions.
    """
    wanted = (rule.test_pairs, rule.noisy_slices, rule.clean_slices)
    total = sum(wanted)
    if n_pairs < 3:
        raise InputError(f"split {rule.name}: {n_pairs} paired position(s); need at least 3 (one per role)")
    if n_pairs >= total:
        return wanted, (None if n_pairs == total else f"{n_pairs - total} of {n_pairs} paired positions unused")
    test, noisy, clean = (max(1, n_pairs * c // total) for c in wanted)
    note = (f"scaled: {n_pairs} paired positions < {total} = {' + '.join(map(str, wanted))}, so every count is "
            f"scaled by {n_pairs}/{total} and rounded down: test {test} (of {wanted[0]}), noisy {noisy} "
            f"(of {wanted[1]}), clean {clean} (of {wanted[2]}); {n_pairs - test - noisy - clean} paired "
            "position(s) unused")
    return (test, noisy, clean), note


def _rank_key(seed: int, patient: str, position_mm: float) -> str:
    """Seeded random rank of one paired position, independent of NumPy versions and file order."""
    return hashlib.sha256(f"{seed}/{patient}/{position_mm:.2f}".encode()).hexdigest()


def _mm_list(values: np.ndarray) -> list[float]:
    return [round(float(z), 3) for z in values]


def _pool_entry(patient: str, series: _ScannedSeries, idx: np.ndarray) -> dict[str, Any]:
    return {"patient": patient, "series": series.folder, "slices": [int(i) for i in idx],
            "positions_mm": _mm_list(series.positions_mm[idx]), "files": [series.files[i] for i in idx]}


def _pair_entry(p: _Patient, pairs: np.ndarray) -> dict[str, Any]:
    return {"patient": p.code, "low_dose": p.low.folder, "reference": p.ref.folder,
            "slices": [int(i) for i in pairs[:, 0]], "reference_slices": [int(i) for i in pairs[:, 1]],
            "positions_mm": _mm_list(p.low.positions_mm[pairs[:, 0]]),
            "low_dose_files": [p.low.files[i] for i in pairs[:, 0]],
            "reference_files": [p.ref.files[i] for i in pairs[:, 1]]}


def _random_positions_split(rule: RandomPositionsRule, patients: Sequence[_Patient], seed: int) -> dict[str, Any]:
    items = [(p, pair) for p in patients for pair in p.pairs]
    (n_test, n_noisy, n_clean), note = paper_counts(len(items), rule)
    ranked = sorted(items, key=lambda item: _rank_key(seed, item[0].code, float(item[0].low.positions_mm[item[1][0]])))
    drawn = {"noisy": ranked[n_test:n_test + n_noisy], "clean": ranked[n_test + n_noisy:n_test + n_noisy + n_clean],
             "test": ranked[:n_test]}
    split: dict[str, Any] = {"description": rule.description, "disjoint": "slice",
                             "counts": {"noisy": n_noisy, "clean": n_clean, "test": n_test},
                             "notes": [f"seed {seed}"] + ([note] if note else [])}
    for role, chosen in drawn.items():
        split[role] = []
        for p in patients:
            pairs = np.array(sorted(tuple(pair) for q, pair in chosen if q is p), int).reshape(-1, 2)
            if len(pairs):
                split[role].append(_pair_entry(p, pairs) if role == "test" else
                                   _pool_entry(p.code, p.low, pairs[:, 0]) if role == "noisy" else
                                   _pool_entry(p.code, p.ref, pairs[:, 1]))
    return split


def _patient_split(rule: PatientRule, patients: Sequence[_Patient], definition: DatasetDefinition) -> dict[str, Any]:
    by_code = {p.code: p for p in patients}
    entries = {
        "noisy": [_pool_entry(c, by_code[c].low, np.arange(len(by_code[c].low.files))) for c in rule.noisy],
        "clean": [_pool_entry(c, by_code[c].ref, np.arange(len(by_code[c].ref.files))) for c in rule.clean],
        "test": [_pair_entry(by_code[c], by_code[c].pairs) for c in rule.test],
    }
    low, ref = (d.name for d in definition.doses)
    note = (f"test {', '.join(rule.test)}; noisy ({low} dose) {', '.join(rule.noisy)}; "
            f"clean ({ref} dose) {', '.join(rule.clean)}")
    return {"description": rule.description, "disjoint": "patient",
            "counts": {role: sum(len(e["slices"]) for e in entries[role]) for role in ROLES},
            "notes": [note], **entries}


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Fixed-width text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


@dataclass(frozen=True)
class PatientScan:
    """Slices found for one patient at the split resolution."""

    patient: str
    low_dose: int
    reference: int
    paired: int


@dataclass(frozen=True)
class ScanSummary:
    """What :func:`scan_dataset` found and wrote."""

    dataset: str
    root: Path
    layout: str
    resolution: str
    dose_names: tuple[str, str]
    pairing_tolerance_mm: float
    out: Path
    patients: tuple[PatientScan, ...]
    split_counts: Mapping[str, Mapping[str, int]]
    split_notes: Mapping[str, tuple[str, ...]]

    def render(self) -> str:
        """Readable multi-line summary (dataset patient codes only; no DICOM patient data)."""
        numbers = [(p.low_dose, p.reference, p.paired, p.low_dose + p.reference - 2 * p.paired) for p in self.patients]
        rows: list[Sequence[object]] = [(p.patient, *n) for p, n in zip(self.patients, numbers)]
        rows.append(("total", *(sum(column) for column in zip(*numbers))))
        lines = [f"{self.dataset} at {self.root} (layout {self.layout}; {self.resolution} series; "
                 f"pairing tolerance {self.pairing_tolerance_mm:g} mm)",
                 text_table(("patient", *self.dose_names, "paired", "unpaired"), rows)]
        for name, counts in self.split_counts.items():
            lines.append(f"split {name}: noisy {counts['noisy']} slices, clean {counts['clean']} slices, "
                         f"test {counts['test']} pairs")
            lines += [f"  {note}" for note in self.split_notes[name]]
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def _inventory(definition: DatasetDefinition, root: Path, layout: str) -> list[dict[str, Any]]:
    """Every series folder of the layout that exists, with its file count (all resolutions)."""
    rows = []
    for patient in definition.patients:
        for dose in definition.doses:
            for res in definition.resolutions:
                folder = definition.folder(layout, patient, dose, res)
                if (root / folder).is_dir():
                    n = sum(1 for f in (root / folder).rglob("*") if f.is_file() and not f.name.startswith("."))
                    rows.append({"patient": patient, "dose": dose.name, "resolution": res,
                                 "folder": folder.as_posix(), "files": n})
    return rows


def _check_output_path(out: Path, root: Path, definition: DatasetDefinition, force: bool) -> None:
    if out.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{out}: is inside the data root {root}; n2g-ct never writes into the data tree")
    if out.exists() and out.resolve() == definition.path.resolve():
        raise ConfigError(f"{out}: is the dataset definition; choose another output file")
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")


def _scan_patient(definition: DatasetDefinition, root: Path, layout: str, code: str) -> _Patient:
    low, ref = (_scan_series(root, definition.folder(layout, code, d, definition.split_resolution))
                for d in definition.doses)
    patient = _Patient(code, low, ref, pair_positions(low.positions_mm, ref.positions_mm,
                                                      definition.pairing_tolerance_mm))
    for series, unpaired in zip((low, ref), patient.unpaired_mm()):
        if len(unpaired):
            log.warning("%s: %d slice(s) of %s have no partner within %g mm (at %s mm); left out of the paired roles",
                        code, len(unpaired), series.folder, definition.pairing_tolerance_mm,
                        ", ".join(f"{z:.2f}" for z in unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""))
    return patient


def scan_dataset(dataset: str | Path, root: Path | str, out: Path | str, *, splits: Sequence[str] | None = None,
                 seed: int | None = None, force: bool = False) -> ScanSummary:
    """Walk a two-dose dataset tree (e.g. Mayo 2016) and write its concrete manifest to ``out``.

    Reads DICOM headers only. Detects the layout, pairs low-dose and reference slices of each
    patient by position along the slice normal (mutual nearest within the definition's tolerance;
    unpaired slices are logged, recorded, and used only by whole-patient pools), builds the
    requested splits and writes the manifest atomically. Same tree and seed give the same bytes.

    Args:
        dataset: definition name (``mayo2016``) or path to a definition YAML.
        root: the dataset folder.
        out: manifest to write (not inside ``root``; an existing file only with ``force``).
        splits: split names to build (default: all of the definition's).
        seed: seed of the random split rules (default: the definition's).

    Raises:
        ConfigError: unknown split name, or an output path that would overwrite an input.
        InputError: layout not found, a patient misses a dose, or a series cannot be read.
    """
    definition = load_definition(dataset)
    root, out = Path(root).expanduser().absolute(), Path(out).expanduser().absolute()
    _check_output_path(out, root, definition, force)
    names = list(dict.fromkeys(splits or definition.splits))
    unknown = [n for n in names if n not in definition.splits]
    if unknown:
        raise ConfigError(f"{definition.name}: no split {', '.join(unknown)}; "
                          f"it defines {', '.join(definition.splits)}")
    seed = definition.seed if seed is None else seed
    layout = detect_layout(definition, root)
    patients = [_scan_patient(definition, root, layout, code) for code in definition.patients]
    built = {}
    for name in names:
        rule = definition.splits[name]
        built[name] = (_random_positions_split(rule, patients, seed) if isinstance(rule, RandomPositionsRule)
                       else _patient_split(rule, patients, definition))
    unpaired = {p.code: {d.name: _mm_list(z) for d, z in zip(definition.doses, p.unpaired_mm())}
                for p in patients if any(len(z) for z in p.unpaired_mm())}
    document = {
        "n2g_ct_manifest": MANIFEST_VERSION,
        "dataset": definition.name,
        "root": str(root),
        "position_tolerance_mm": definition.pairing_tolerance_mm,
        "provenance": {"generated_by": f"n2g-ct {__version__} manifest scan", "definition": definition.name,
                       "layout": layout, "resolution": definition.split_resolution, "seed": seed,
                       "pairing_tolerance_mm": definition.pairing_tolerance_mm, "unpaired_positions_mm": unpaired},
        "splits": built,
        "inventory": _inventory(definition, root, layout),
    }
    header = (f"# Concrete {definition.name} manifest written by `n2g-ct manifest scan` "
              "(schema: data_manifests/README.md).\n"
              "# Paths are relative to `root`; slice indices count in position order along the slice normal.\n"
              "# Validate with `n2g-ct manifest check FILE [--data-root DIR]`; regenerate rather than edit.\n")
    write_text_atomic(out, header + yaml.dump(document, Dumper=YAML_DUMPER, sort_keys=False, default_flow_style=None,
                                         width=120))
    log.info("wrote %s", out)
    return ScanSummary(
        dataset=definition.name, root=root, layout=layout, resolution=definition.split_resolution,
        dose_names=(definition.low_dose.name, definition.reference_dose.name),
        pairing_tolerance_mm=definition.pairing_tolerance_mm, out=out,
        patients=tuple(PatientScan(p.code, len(p.low.files), len(p.ref.files), len(p.pairs)) for p in patients),
        split_counts={n: s["counts"] for n, s in built.items()},
        split_notes={n: tuple(s["notes"]) for n, s in built.items()},
    )
