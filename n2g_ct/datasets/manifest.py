"""Dataset manifests: which slices of which series form the noisy pool, the clean pool and the test pairs.

Two kinds of YAML document live in ``data_manifests/`` (schema and examples: its ``README.md``):

- a *manifest* (``n2g_ct_manifest: 1``): named splits, each with ``noisy`` and ``clean`` pool entries
  (series + optional slice indices) and optional paired ``test`` entries. :func:`load_split` turns one
  split into the :class:`Split` the data layer consumes; :func:`check_manifest` validates one.
- a *dataset definition* (``n2g_ct_dataset: 1``, e.g. ``mayo2016.yaml``): the on-disk layouts of a
  public two-dose dataset and the rules of its splits. :func:`scan_dataset` walks a real tree
  with it and writes the concrete manifest (every slice listed with its file and position).

Slice indices always count in the position-sorted order of a series (z ascending along the slice
normal, as :func:`n2g_ct.io.dicom.scan_dicom` sorts), never in InstanceNumber or file-name order.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from n2g_ct import __version__
from n2g_ct.atomic import write_text_atomic
from n2g_ct.errors import ConfigError, InputError

if TYPE_CHECKING:
    from n2g_ct.io.dicom import DicomSeries

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFINITION_VERSION = 1
ROLES = ("noisy", "clean", "test")
DISJOINT_MODES = ("slice", "patient")
DEFAULT_POSITION_TOLERANCE_MM = 0.1
# Shipped dataset definitions (source checkout / editable install).
DEFINITIONS_DIR = Path(__file__).resolve().parents[2] / "data_manifests"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --------------------------------------------------------------------------------------------------
# What the data layer consumes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSelection:
    """Some slices of one series (a noisy- or clean-pool entry).

    Attributes:
        series: series folder, single DICOM file or NIfTI file.
        slices: indices in the position-sorted order (z ascending along the slice normal);
            ``None`` means every slice.
    """

    series: Path
    slices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PairSelection:
    """A paired test entry: the same slice positions in a low-dose and a reference series.

    Attributes:
        low_dose: low-dose series (folder, DICOM file or NIfTI).
        reference: reference (routine/full-dose) series of the same scan.
        slices: position-sorted indices in ``low_dose``; ``None`` means every slice.
        reference_slices: the matching indices in ``reference`` (same length as ``slices``);
            left out (``None``) it is set to ``slices``, i.e. both series have the same positions.
    """

    low_dose: Path
    reference: Path
    slices: tuple[int, ...] | None = None
    reference_slices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.reference_slices is None:
            object.__setattr__(self, "reference_slices", self.slices)


@dataclass(frozen=True)
class Split:
    """One named split of a manifest, paths resolved."""

    name: str
    noisy: tuple[SliceSelection, ...]
    clean: tuple[SliceSelection, ...]
    test: tuple[PairSelection, ...]


# --------------------------------------------------------------------------------------------------
# A parsed manifest, with what it recorded about each slice (for checking)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesUse:
    """The slices of one series used in one role, with the files and positions the manifest recorded.

    Attributes:
        role: ``noisy``, ``clean`` or ``test``.
        series: resolved series path.
        slices: position-sorted indices, or ``None`` for every slice.
        files: resolved file of each listed slice (concrete manifests), else ``None``.
        positions_mm: position of each listed slice along the slice normal (mm), else ``None``.
        patient: dataset-level patient label (e.g. ``L067``; never a DICOM PatientID), or ``None``.
    """

    role: str
    series: Path
    slices: tuple[int, ...] | None = None
    files: tuple[Path, ...] | None = None
    positions_mm: tuple[float, ...] | None = None
    patient: str | None = None

    @property
    def label(self) -> str:
        """Row label in summaries: the patient, else the series folder/file name."""
        return self.patient or self.series.name


@dataclass(frozen=True)
class ManifestSplit:
    """One split as written in the manifest.

    Attributes:
        disjoint: ``slice`` (no slice position in two roles) or ``patient`` (no patient in two roles).
        counts: slices per role (test: pairs) recorded when the manifest was generated, or ``None``.
        notes: free-text statements recorded with the split (e.g. how counts were scaled).
    """

    name: str
    description: str
    disjoint: str
    noisy: tuple[SeriesUse, ...]
    clean: tuple[SeriesUse, ...]
    test: tuple[tuple[SeriesUse, SeriesUse], ...]
    counts: Mapping[str, int] | None = None
    notes: tuple[str, ...] = ()

    def uses(self) -> Iterator[SeriesUse]:
        """Every series use of the split; a test pair gives its low-dose and its reference use."""
        yield from self.noisy
        yield from self.clean
        for low, ref in self.test:
            yield low
            yield ref

    def counted_uses(self) -> Iterator[SeriesUse]:
        """One use per counted item: pool slices, and the low-dose side of each test pair."""
        yield from self.noisy
        yield from self.clean
        for low, _ in self.test:
            yield low

    def selection(self) -> Split:
        """The resolved :class:`Split` the data layer consumes."""
        return Split(
            name=self.name,
            noisy=tuple(SliceSelection(u.series, u.slices) for u in self.noisy),
            clean=tuple(SliceSelection(u.series, u.slices) for u in self.clean),
            test=tuple(PairSelection(low.series, ref.series, low.slices, ref.slices) for low, ref in self.test),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest file with its paths resolved against ``root``."""

    path: Path
    dataset: str
    root: Path
    position_tolerance_mm: float
    splits: Mapping[str, ManifestSplit]
    default_split: str | None = None

    def split(self, name: str | None = None) -> ManifestSplit:
        """The split called ``name``; without a name the default or only split.

        Raises:
            ConfigError: unknown name, or no name given where the manifest has several splits.
        """
        name = name or self.default_split or (next(iter(self.splits)) if len(self.splits) == 1 else None)
        if name is None:
            raise ConfigError(f"{self.path}: holds splits {', '.join(self.splits)}; name the one to use")
        if name not in self.splits:
            raise ConfigError(f"{self.path}: no split {name!r}; it holds {', '.join(self.splits)}")
        return self.splits[name]


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = {"n2g_ct_manifest", "dataset", "root", "position_tolerance_mm", "default_split", "splits",
             "provenance", "inventory"}
_SPLIT_KEYS = {"description", "disjoint", "counts", "notes", *ROLES}
_POOL_KEYS = {"series", "slices", "files", "positions_mm", "patient"}
_PAIR_KEYS = {"low_dose", "reference", "slices", "reference_slices", "low_dose_files", "reference_files",
              "positions_mm", "patient"}
_DEFINITION_KEYS = {"n2g_ct_dataset", "name", "description", "patients", "low_dose", "reference_dose",
                    "resolutions", "split_resolution", "layouts", "pairing_tolerance_mm", "seed", "splits"}


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None


def _mapping(value: Any, where: str, allowed: set[str] | None = None, required: Sequence[str] = ()) -> dict[str, Any]:
    """``value`` as a dict with every ``required`` key and, when ``allowed`` is given, no other key."""
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - allowed)) if allowed is not None else []
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed or ()))}")
    missing = [k for k in required if k not in value]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(missing)}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _optional_string(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _millimetres(value: Any, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise InputError(f"{where}: expected a {'positive' if positive else 'non-negative'} number (mm), got {value!r}")
    return float(value)


def _int_list(value: Any, where: str) -> tuple[int, ...] | None:
    """Optional list of distinct non-negative integers (slice indices)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise InputError(f"{where}: expected a list of non-negative integer slice indices")
    if len(set(value)) != len(value):
        raise InputError(f"{where}: lists a slice index twice")
    return tuple(value)


def _per_slice(value: Any, where: str, n: int | None, kind: type) -> list[Any] | None:
    """Optional per-slice list (``str`` paths or ``float`` mm) as long as the slice indices."""
    if value is None:
        return None
    if n is None:
        raise InputError(f"{where}: per-slice lists need explicit 'slices' to align with")
    numbers = kind is float
    if not isinstance(value, list) or not all(
        (isinstance(v, (int, float)) and not isinstance(v, bool)) if numbers else isinstance(v, str) for v in value
    ):
        raise InputError(f"{where}: expected a list of {'numbers (mm)' if numbers else 'paths'}")
    if len(value) != n:
        raise InputError(f"{where}: has {len(value)} item(s) for {n} slice index(es)")
    return value


class _Resolver:
    """Resolves manifest paths: absolute paths stay, relative ones are joined to the root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, value: Any, where: str) -> Path:
        p = Path(_string(value, where)).expanduser()
        return p if p.is_absolute() else self.root / p

    def files(self, entry: dict[str, Any], key: str, where: str, n: int | None) -> tuple[Path, ...] | None:
        values = _per_slice(entry.get(key), f"{where}.{key}", n, str)
        return None if values is None else tuple(self.path(v, f"{where}.{key}") for v in values)


def _positions(entry: dict[str, Any], where: str, n: int | None) -> tuple[float, ...] | None:
    values = _per_slice(entry.get("positions_mm"), f"{where}.positions_mm", n, float)
    return None if values is None else tuple(float(v) for v in values)


def _parse_pool_entry(raw: Any, role: str, where: str, resolve: _Resolver) -> SeriesUse:
    entry = _mapping(raw, where, _POOL_KEYS, ("series",))
    slices = _int_list(entry.get("slices"), f"{where}.slices")
    n = None if slices is None else len(slices)
    return SeriesUse(
        role=role,
        series=resolve.path(entry["series"], f"{where}.series"),
        slices=slices,
        files=resolve.files(entry, "files", where, n),
        positions_mm=_positions(entry, where, n),
        patient=_optional_string(entry.get("patient"), f"{where}.patient"),
    )


def _parse_pair_entry(raw: Any, where: str, resolve: _Resolver) -> tuple[SeriesUse, SeriesUse]:
    entry = _mapping(raw, where, _PAIR_KEYS, ("low_dose", "reference"))
    slices = _int_list(entry.get("slices"), f"{where}.slices")
    ref_slices = _int_list(entry.get("reference_slices"), f"{where}.reference_slices")
    if ref_slices is not None and (slices is None or len(ref_slices) != len(slices)):
        raise InputError(f"{where}: 'reference_slices' needs 'slices' of the same length")
    n = None if slices is None else len(slices)
    positions = _positions(entry, where, n)
    patient = _optional_string(entry.get("patient"), f"{where}.patient")
    low = SeriesUse("test", resolve.path(entry["low_dose"], f"{where}.low_dose"), slices,
                    resolve.files(entry, "low_dose_files", where, n), positions, patient)
    ref = SeriesUse("test", resolve.path(entry["reference"], f"{where}.reference"),
                    slices if ref_slices is None else ref_slices,
                    resolve.files(entry, "reference_files", where, n), positions, patient)
    return low, ref


def _parse_split(name: str, raw: Any, where: str, resolve: _Resolver) -> ManifestSplit:
    split = _mapping(raw, where, _SPLIT_KEYS)
    disjoint = split.get("disjoint", "slice")
    if disjoint not in DISJOINT_MODES:
        raise InputError(f"{where}.disjoint: expected one of {', '.join(DISJOINT_MODES)}, got {disjoint!r}")
    lists = {role: split.get(role) or [] for role in ROLES}
    for role, value in lists.items():
        if not isinstance(value, list):
            raise InputError(f"{where}.{role}: expected a list of entries")
    if not any(lists.values()):
        raise InputError(f"{where}: has no noisy, clean or test entry")
    counts = split.get("counts")
    if counts is not None and (not isinstance(counts, dict) or set(counts) - set(ROLES)
                               or not all(type(v) is int for v in counts.values())):
        raise InputError(f"{where}.counts: expected integer counts for {', '.join(ROLES)}")
    notes = split.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise InputError(f"{where}.notes: expected a list of strings")
    return ManifestSplit(
        name=name,
        description=str(split.get("description", "")),
        disjoint=disjoint,
        noisy=tuple(_parse_pool_entry(e, "noisy", f"{where}.noisy[{i}]", resolve)
                    for i, e in enumerate(lists["noisy"])),
        clean=tuple(_parse_pool_entry(e, "clean", f"{where}.clean[{i}]", resolve)
                    for i, e in enumerate(lists["clean"])),
        test=tuple(_parse_pair_entry(e, f"{where}.test[{i}]", resolve) for i, e in enumerate(lists["test"])),
        counts=counts,
        notes=tuple(notes),
    )


def _manifest_root(path: Path, declared: Any, data_root: Path | str | None) -> Path:
    """``data_root`` if given, else the declared root (relative to the manifest's folder), else that folder."""
    if data_root is not None:
        return Path(data_root).expanduser().absolute()
    base = path.absolute().parent
    return base if declared is None else base / Path(_string(declared, f"{path}: root")).expanduser()


def load_manifest(manifest_path: Path | str, data_root: Path | str | None = None) -> Manifest:
    """Parse and validate a manifest file.

    Args:
        manifest_path: the YAML manifest.
        data_root: folder that relative paths in the manifest are relative to; overrides the
            manifest's ``root`` (use it when the data moved). Default: the manifest's ``root``,
            itself relative to the manifest's folder, or that folder when no root is declared.

    Raises:
        InputError: missing file, invalid YAML, a dataset definition instead of a manifest, or an
            invalid entry (the message names the file and the key path, e.g. ``splits.paper.noisy[2]``).
    """
    path = Path(manifest_path)
    raw = _read_yaml(path)
    if isinstance(raw, dict) and "n2g_ct_dataset" in raw:
        raise InputError(
            f"{path}: is a dataset definition, not a manifest; make a manifest from it with "
            f"`n2g-ct manifest scan {raw.get('name', path.stem)} --root DATA_DIR --out FILE`"
        )
    top = _mapping(raw, str(path), _TOP_KEYS, ("n2g_ct_manifest", "splits"))
    if top["n2g_ct_manifest"] != MANIFEST_VERSION:
        raise InputError(f"{path}: n2g_ct_manifest {top['n2g_ct_manifest']!r} is not supported "
                         f"(expected {MANIFEST_VERSION})")
    tolerance = _millimetres(top.get("position_tolerance_mm", DEFAULT_POSITION_TOLERANCE_MM),
                             f"{path}: position_tolerance_mm", positive=False)
    splits_raw = _mapping(top["splits"], f"{path}: splits")
    if not splits_raw:
        raise InputError(f"{path}: 'splits' is empty")
    resolve = _Resolver(_manifest_root(path, top.get("root"), data_root))
    splits = {str(name): _parse_split(str(name), s, f"{path}: splits.{name}", resolve)
              for name, s in splits_raw.items()}
    default = top.get("default_split")
    if default is not None and default not in splits:
        raise InputError(f"{path}: default_split {default!r} is not one of {', '.join(splits)}")
    return Manifest(path, str(top.get("dataset", path.stem)), resolve.root, tolerance, splits, default)


def load_split(manifest_path: Path | str, split_name: str | None = None,
               data_root: Path | str | None = None) -> Split:
    """The resolved :class:`Split` called ``split_name`` (default: the manifest's default or only split).

    Relative paths resolve against ``data_root``, else the manifest's declared ``root``.

    Raises:
        InputError: the manifest is missing or invalid.
        ConfigError: unknown split name, or none given where the manifest holds several.
    """
    return load_manifest(manifest_path, data_root).split(split_name).selection()


# --------------------------------------------------------------------------------------------------
# Dataset definitions (data_manifests/mayo2016.yaml)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dose:
    """One dose level: folder word (``full``) and layout code (``FD``)."""

    name: str
    code: str


@dataclass(frozen=True)
class RandomPositionsRule:
    """Paper-style split: paired positions drawn at random into test pairs, noisy and clean pools.

    Counts are for a complete tree; :func:`paper_counts` scales them down for smaller trees.
    """

    name: str
    description: str
    test_pairs: int
    noisy_slices: int
    clean_slices: int


@dataclass(frozen=True)
class PatientRule:
    """Patient-level split: whole patients per role."""

    name: str
    description: str
    test: tuple[str, ...]
    noisy: tuple[str, ...]
    clean: tuple[str, ...]


SplitRule = RandomPositionsRule | PatientRule


@dataclass(frozen=True)
class DatasetDefinition:
    """A public two-dose dataset: patients, layouts on disk, and split rules.

    Attributes:
        layouts: name → folder template relative to the root with ``{patient}``, ``{dose}``,
            ``{dose_code}`` and ``{resolution}`` fields.
        split_resolution: the resolution whose series the splits use (e.g. ``1mm``).
        pairing_tolerance_mm: largest distance along the slice normal between a low-dose and a
            reference slice that count as the same position.
        seed: default seed of the random split rules.
    """

    path: Path
    name: str
    description: str
    patients: tuple[str, ...]
    low_dose: Dose
    reference_dose: Dose
    resolutions: tuple[str, ...]
    split_resolution: str
    layouts: Mapping[str, str]
    pairing_tolerance_mm: float
    seed: int
    splits: Mapping[str, SplitRule]

    @property
    def doses(self) -> tuple[Dose, Dose]:
        """(low dose, reference dose)."""
        return self.low_dose, self.reference_dose

    def folder(self, layout: str, patient: str, dose: Dose, resolution: str) -> Path:
        """Series folder of one patient/dose/resolution, relative to the root."""
        return Path(self.layouts[layout].format(patient=patient, dose=dose.name, dose_code=dose.code,
                                                resolution=resolution))


def _patients(value: Any, where: str, known: Sequence[str] = ()) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise InputError(f"{where}: expected a non-empty list of patient codes")
    if len(set(value)) != len(value):
        raise InputError(f"{where}: lists a patient twice")
    unknown = [p for p in value if known and p not in known]
    if unknown:
        raise InputError(f"{where}: unknown patient(s) {', '.join(unknown)}")
    return tuple(value)


def _positive_int(value: Any, where: str) -> int:
    if type(value) is not int or value < 1:
        raise InputError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _parse_rule(name: str, raw: Any, where: str, patients: tuple[str, ...]) -> SplitRule:
    kind = _mapping(raw, where, required=("kind",))["kind"]
    if kind == "random_positions":
        counts = ("test_pairs", "noisy_slices", "clean_slices")
        rule = _mapping(raw, where, {"kind", "description", *counts}, counts)
        return RandomPositionsRule(name, str(rule.get("description", "")),
                                   *(_positive_int(rule[k], f"{where}.{k}") for k in counts))
    if kind == "by_patient":
        rule = _mapping(raw, where, {"kind", "description", *ROLES}, ROLES)
        groups = {r: _patients(rule[r], f"{where}.{r}", patients) for r in ROLES}
        listed = [p for g in groups.values() for p in g]
        shared = sorted({p for p in listed if listed.count(p) > 1})
        if shared:
            raise InputError(f"{where}: patient(s) {', '.join(shared)} in two roles")
        return PatientRule(name, str(rule.get("description", "")), **groups)
    raise InputError(f"{where}.kind: expected random_positions or by_patient, got {kind!r}")


def _dose(raw: Any, where: str) -> Dose:
    dose = _mapping(raw, where, {"name", "code"}, ("name", "code"))
    return Dose(_string(dose["name"], f"{where}.name"), _string(dose["code"], f"{where}.code"))


def _layout(template: Any, where: str) -> str:
    try:
        _string(template, where).format(patient="P", dose="d", dose_code="D", resolution="r")
    except (AttributeError, KeyError, IndexError, ValueError) as exc:
        fields = "{patient} {dose} {dose_code} {resolution}"
        raise InputError(f"{where}: bad template field {exc}; use {fields}") from None
    return template


def load_definition(dataset: str | Path) -> DatasetDefinition:
    """A dataset definition by name (``mayo2016`` → ``data_manifests/mayo2016.yaml``) or by ``.yaml`` path.

    Raises:
        ConfigError: no definition of that name.
        InputError: the file is not a valid definition.
    """
    path = Path(dataset)
    if path.suffix not in (".yaml", ".yml"):
        path = DEFINITIONS_DIR / f"{dataset}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in DEFINITIONS_DIR.glob("*.yaml")) if DEFINITIONS_DIR.is_dir() else []
            raise ConfigError(f"no dataset definition {str(dataset)!r} in {DEFINITIONS_DIR} (found: "
                              f"{', '.join(known) or 'none'}); pass the path of a definition YAML instead")
    top = _mapping(_read_yaml(path), str(path), _DEFINITION_KEYS, sorted(_DEFINITION_KEYS - {"description"}))
    if top["n2g_ct_dataset"] != DEFINITION_VERSION:
        raise InputError(f"{path}: n2g_ct_dataset {top['n2g_ct_dataset']!r} is not supported "
                         f"(expected {DEFINITION_VERSION})")
    patients = _patients(top["patients"], f"{path}: patients")
    resolutions = top["resolutions"]
    if not isinstance(resolutions, list) or top["split_resolution"] not in resolutions:
        raise InputError(f"{path}: split_resolution must be one of the listed resolutions")
    layouts = {str(n): _layout(t, f"{path}: layouts.{n}")
               for n, t in _mapping(top["layouts"], f"{path}: layouts").items()}
    rules = _mapping(top["splits"], f"{path}: splits")
    if not layouts or not rules:
        raise InputError(f"{path}: define at least one layout and one split")
    if type(top["seed"]) is not int:
        raise InputError(f"{path}: seed must be an integer")
    return DatasetDefinition(
        path=path,
        name=_string(top["name"], f"{path}: name"),
        description=str(top.get("description", "")),
        patients=patients,
        low_dose=_dose(top["low_dose"], f"{path}: low_dose"),
        reference_dose=_dose(top["reference_dose"], f"{path}: reference_dose"),
        resolutions=tuple(map(str, resolutions)),
        split_resolution=str(top["split_resolution"]),
        layouts=layouts,
        pairing_tolerance_mm=_millimetres(top["pairing_tolerance_mm"], f"{path}: pairing_tolerance_mm", positive=True),
        seed=top["seed"],
        splits={str(n): _parse_rule(str(n), r, f"{path}: splits.{n}", patients) for n, r in rules.items()},
    )


# --------------------------------------------------------------------------------------------------
# Scanning a tree into a concrete manifest
# --------------------------------------------------------------------------------------------------


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


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
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
                 _table(("patient", *self.dose_names, "paired", "unpaired"), rows)]
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
    write_text_atomic(out, header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=None,
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


# --------------------------------------------------------------------------------------------------
# Checking a manifest
# --------------------------------------------------------------------------------------------------


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
    table = _table(("patient/series", "noisy", "clean", "test pairs"),
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
