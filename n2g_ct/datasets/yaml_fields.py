"""Reading the fields of the project's YAML documents (manifests, dataset definitions), each problem
named with the document and the field's place in it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from n2g_ct.errors import InputError

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None


def mapping(value: Any, where: str, allowed: set[str] | None = None, required: Sequence[str] = ()) -> dict[str, Any]:
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


def string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def optional_string(value: Any, where: str) -> str | None:
    return None if value is None else string(value, where)


def millimetres(value: Any, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise InputError(f"{where}: expected a {'positive' if positive else 'non-negative'} number (mm), got {value!r}")
    return float(value)


def int_list(value: Any, where: str) -> tuple[int, ...] | None:
    """Optional list of distinct non-negative integers (slice indices)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise InputError(f"{where}: expected a list of non-negative integer slice indices")
    if len(set(value)) != len(value):
        raise InputError(f"{where}: lists a slice index twice")
    return tuple(value)


def per_slice(value: Any, where: str, n: int | None, kind: type) -> list[Any] | None:
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
