"""Dataset definitions (``n2g_ct_dataset: 1``, e.g. ``data_manifests/mayo2016.yaml``): the on-disk layouts
of a public two-dose dataset and the rules of its splits (schema: ``data_manifests/README.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from n2g_ct.errors import ConfigError, InputError

if TYPE_CHECKING:
    pass

from n2g_ct.datasets.manifest import ROLES
from n2g_ct.datasets.yaml_fields import mapping, millimetres, read_yaml, string

DEFINITION_VERSION = 1
# Shipped dataset definitions (source checkout / editable install).
DEFINITIONS_DIR = Path(__file__).resolve().parents[2] / "data_manifests"
_DEFINITION_KEYS = {"n2g_ct_dataset", "name", "description", "patients", "low_dose", "reference_dose",
                    "resolutions", "split_resolution", "layouts", "pairing_tolerance_mm", "seed", "splits"}



@dataclass(frozen=True)
class Dose:
    """One dose level: folder word (``full``) and layout code (``FD``)."""

    name: str
    code: str


@dataclass(frozen=True)
class RandomPositionsRule:
    """Paper-style split: paired positions drawn at random into test pairs, noisy and clean pools.

    Counts are for a complete tree; :func:`~n2g_ct.datasets.scan.paper_counts` scales them down for smaller trees.
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
    kind = mapping(raw, where, required=("kind",))["kind"]
    if kind == "random_positions":
        counts = ("test_pairs", "noisy_slices", "clean_slices")
        rule = mapping(raw, where, {"kind", "description", *counts}, counts)
        return RandomPositionsRule(name, str(rule.get("description", "")),
                                   *(_positive_int(rule[k], f"{where}.{k}") for k in counts))
    if kind == "by_patient":
        rule = mapping(raw, where, {"kind", "description", *ROLES}, ROLES)
        groups = {r: _patients(rule[r], f"{where}.{r}", patients) for r in ROLES}
        listed = [p for g in groups.values() for p in g]
        shared = sorted({p for p in listed if listed.count(p) > 1})
        if shared:
            raise InputError(f"{where}: patient(s) {', '.join(shared)} in two roles")
        return PatientRule(name, str(rule.get("description", "")), **groups)
    raise InputError(f"{where}.kind: expected random_positions or by_patient, got {kind!r}")


def _dose(raw: Any, where: str) -> Dose:
    dose = mapping(raw, where, {"name", "code"}, ("name", "code"))
    return Dose(string(dose["name"], f"{where}.name"), string(dose["code"], f"{where}.code"))


def _layout(template: Any, where: str) -> str:
    try:
        string(template, where).format(patient="P", dose="d", dose_code="D", resolution="r")
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
    top = mapping(read_yaml(path), str(path), _DEFINITION_KEYS, sorted(_DEFINITION_KEYS - {"description"}))
    if top["n2g_ct_dataset"] != DEFINITION_VERSION:
        raise InputError(f"{path}: n2g_ct_dataset {top['n2g_ct_dataset']!r} is not supported "
                         f"(expected {DEFINITION_VERSION})")
    patients = _patients(top["patients"], f"{path}: patients")
    resolutions = top["resolutions"]
    if not isinstance(resolutions, list) or top["split_resolution"] not in resolutions:
        raise InputError(f"{path}: split_resolution must be one of the listed resolutions")
    layouts = {str(n): _layout(t, f"{path}: layouts.{n}")
               for n, t in mapping(top["layouts"], f"{path}: layouts").items()}
    rules = mapping(top["splits"], f"{path}: splits")
    if not layouts or not rules:
        raise InputError(f"{path}: define at least one layout and one split")
    if type(top["seed"]) is not int:
        raise InputError(f"{path}: seed must be an integer")
    return DatasetDefinition(
        path=path,
        name=string(top["name"], f"{path}: name"),
        description=str(top.get("description", "")),
        patients=patients,
        low_dose=_dose(top["low_dose"], f"{path}: low_dose"),
        reference_dose=_dose(top["reference_dose"], f"{path}: reference_dose"),
        resolutions=tuple(map(str, resolutions)),
        split_resolution=str(top["split_resolution"]),
        layouts=layouts,
        pairing_tolerance_mm=millimetres(top["pairing_tolerance_mm"], f"{path}: pairing_tolerance_mm", positive=True),
        seed=top["seed"],
        splits={str(n): _parse_rule(str(n), r, f"{path}: splits.{n}", patients) for n, r in rules.items()},
    )
