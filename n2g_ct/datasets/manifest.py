"""Dataset manifests (``n2g_ct_manifest: 1``): which slices of which series form the noisy pool, the
clean pool and the test pairs, as named splits (schema and examples: ``data_manifests/README.md``).
:func:`load_split` turns one split into the :class:`~n2g_ct.datasets.selection.Split` the data layer
consumes. Dataset definitions (:mod:`~n2g_ct.datasets.definition`), scanning a tree into a manifest
(:mod:`~n2g_ct.datasets.scan`) and checking one (:mod:`~n2g_ct.datasets.check`) have modules of their own.

Slice indices always count in the position-sorted order of a series (z ascending along the slice
normal, as :func:`n2g_ct.io.dicom.scan_dicom` sorts), never in InstanceNumber or file-name order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from n2g_ct.errors import ConfigError, InputError

if TYPE_CHECKING:
    pass

from n2g_ct.datasets.selection import PairSelection, SliceSelection, Split
from n2g_ct.datasets.yaml_fields import (
    int_list,
    mapping,
    millimetres,
    optional_string,
    per_slice,
    read_yaml,
    string,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ROLES = ("noisy", "clean", "test")
DISJOINT_MODES = ("slice", "patient")
DEFAULT_POSITION_TOLERANCE_MM = 0.1





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


class _Resolver:
    """Resolves manifest paths: absolute paths stay, relative ones are joined to the root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, value: Any, where: str) -> Path:
        p = Path(string(value, where)).expanduser()
        return p if p.is_absolute() else self.root / p

    def files(self, entry: dict[str, Any], key: str, where: str, n: int | None) -> tuple[Path, ...] | None:
        values = per_slice(entry.get(key), f"{where}.{key}", n, str)
        return None if values is None else tuple(self.path(v, f"{where}.{key}") for v in values)


def _positions(entry: dict[str, Any], where: str, n: int | None) -> tuple[float, ...] | None:
    values = per_slice(entry.get("positions_mm"), f"{where}.positions_mm", n, float)
    return None if values is None else tuple(float(v) for v in values)


def _parse_pool_entry(raw: Any, role: str, where: str, resolve: _Resolver) -> SeriesUse:
    entry = mapping(raw, where, _POOL_KEYS, ("series",))
    slices = int_list(entry.get("slices"), f"{where}.slices")
    n = None if slices is None else len(slices)
    return SeriesUse(
        role=role,
        series=resolve.path(entry["series"], f"{where}.series"),
        slices=slices,
        files=resolve.files(entry, "files", where, n),
        positions_mm=_positions(entry, where, n),
        patient=optional_string(entry.get("patient"), f"{where}.patient"),
    )


def _parse_pair_entry(raw: Any, where: str, resolve: _Resolver) -> tuple[SeriesUse, SeriesUse]:
    entry = mapping(raw, where, _PAIR_KEYS, ("low_dose", "reference"))
    slices = int_list(entry.get("slices"), f"{where}.slices")
    ref_slices = int_list(entry.get("reference_slices"), f"{where}.reference_slices")
    if ref_slices is not None and (slices is None or len(ref_slices) != len(slices)):
        raise InputError(f"{where}: 'reference_slices' needs 'slices' of the same length")
    n = None if slices is None else len(slices)
    positions = _positions(entry, where, n)
    patient = optional_string(entry.get("patient"), f"{where}.patient")
    low = SeriesUse("test", resolve.path(entry["low_dose"], f"{where}.low_dose"), slices,
                    resolve.files(entry, "low_dose_files", where, n), positions, patient)
    ref = SeriesUse("test", resolve.path(entry["reference"], f"{where}.reference"),
                    slices if ref_slices is None else ref_slices,
                    resolve.files(entry, "reference_files", where, n), positions, patient)
    return low, ref


def _parse_split(name: str, raw: Any, where: str, resolve: _Resolver) -> ManifestSplit:
    split = mapping(raw, where, _SPLIT_KEYS)
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
    return base if declared is None else base / Path(string(declared, f"{path}: root")).expanduser()


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
    raw = read_yaml(path)
    if isinstance(raw, dict) and "n2g_ct_dataset" in raw:
        raise InputError(
            f"{path}: is a dataset definition, not a manifest; make a manifest from it with "
            f"`n2g-ct manifest scan {raw.get('name', path.stem)} --root DATA_DIR --out FILE`"
        )
    top = mapping(raw, str(path), _TOP_KEYS, ("n2g_ct_manifest", "splits"))
    if top["n2g_ct_manifest"] != MANIFEST_VERSION:
        raise InputError(f"{path}: n2g_ct_manifest {top['n2g_ct_manifest']!r} is not supported "
                         f"(expected {MANIFEST_VERSION})")
    tolerance = millimetres(top.get("position_tolerance_mm", DEFAULT_POSITION_TOLERANCE_MM),
                             f"{path}: position_tolerance_mm", positive=False)
    splits_raw = mapping(top["splits"], f"{path}: splits")
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
