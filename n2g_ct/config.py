"""Typed configuration: frozen dataclasses validated at construction; YAML is only storage.

A config file maps onto nested dataclasses. Unknown keys, wrong types and out-of-range values are
reported together, each with its dotted key (``train.steps: must be ≥ 1, got 0``), before anything
runs. Command-line overrides use the same dotted keys: ``train.steps=2000 data.crop_size=96``.
Configs never execute code (``yaml.safe_load`` only).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from n2g_ct.errors import ConfigError

T = TypeVar("T")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """``value`` converted to annotation ``tp``; appends ``key: problem`` to ``errors`` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, errors)
        for candidate in inner:
            trial: list[str] = []
            converted = _convert(value, candidate, key, trial)
            if not trial:
                return converted
        errors.append(f"{key}: expected one of {', '.join(_type_name(a) for a in inner)}, got {value!r}")
        return None
    if origin is typing.Literal:
        if value not in args:
            errors.append(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a list, got {value!r}")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value))
        if len(value) != len(args):
            errors.append(f"{key}: expected {len(args)} values, got {len(value)}")
            return None
        return tuple(_convert(v, a, f"{key}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return None
        return _build(tp, value, f"{key}.", errors)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            errors.append(f"{key}: expected a path, got {value!r}")
        return Path(value) if isinstance(value, (str, Path)) else None
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {value!r}")
            return None
        return float(value)
    if tp in (int, bool, str):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            errors.append(f"{key}: expected {tp.__name__}, got {value!r}")
            return None
        return value
    return value


def _build(cls: type[T], data: dict, prefix: str, errors: list[str]) -> T | None:
    before = len(errors)  # problems found elsewhere must not hide this section's own checks
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    removed = getattr(cls, "REMOVED", {})
    for name in sorted(set(data) - set(fields)):
        if name not in removed:
            errors.append(f"{prefix}{name}: unknown key (allowed: {', '.join(fields)})")
        elif data[name] not in removed[name][1]:  # a removed key at its old default changes nothing
            errors.append(f"{prefix}{name}: removed ({removed[name][0]})")
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}", errors)
        elif fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required")
    if len(errors) > before:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as exc:
        errors.append(f"{prefix.rstrip('.') or cls.__name__}: {exc}")
        return None


def from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    """Build dataclass ``cls`` from a plain mapping; ConfigError listing every problem at once."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    result = _build(cls, data, "", errors)
    if errors or result is None:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"  - {e}" for e in errors))
    return result


def _plain(value: Any) -> Any:
    """``value`` as YAML-safe data: dataclasses as mappings, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_dict(config: Any) -> dict:
    """Plain YAML-safe mapping of a config dataclass (paths as strings, tuples as lists)."""
    return _plain(config)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with ``dotted.key=value`` overrides applied (values parsed as YAML).

    A numeric part indexes a list: ``train.0.config.optim.lr=1e-3``.
    """
    result = yaml.safe_load(yaml.safe_dump(data))  # deep copy through the storage format
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.steps=1000")
        node: Any = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = _child(node, part, item)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(node, list):
            node[_list_index(node, leaf, item)] = value
        else:
            node[leaf] = value
    return result


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _child(node: Any, part: str, item: str) -> Any:
    """The section ``part`` of ``node`` (created when missing), or its list item."""
    node = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"override {item!r}: {part} is not a section")
    return node


def load_yaml(path: Path) -> dict:
    """The mapping stored in a YAML file; ConfigError naming the file when it cannot be read."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: Path, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file with ``key=value`` overrides; every problem reported at once."""
    return from_dict(cls, apply_overrides(load_yaml(path), overrides), source=str(path))


def _field_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` section of a dataclass docstring, one line each."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    names: list[str] = []
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        match = re.match(r"^\s{4,8}([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
        if match and not line.startswith(" " * 12):
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                docs[name] = match.group(2).strip()
        elif stripped and names and line.startswith(" " * 12):
            for name in names:
                docs[name] += " " + stripped
        elif not stripped:
            names = []
        else:
            break
    return docs


def config_template(cls: type, indent: str = "") -> str:
    """A YAML template of dataclass ``cls``: every field at its default, each under its description
    (from the ``Attributes:`` docstring section), nested sections indented."""
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        section = next((k for k in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(k)), None)
        doc = docs.get(f.name, "") + (f" (a section of {section.__name__} fields)" if section and default is None else "")
        lines += [f"{indent}# {line}" for line in textwrap.wrap(doc, 100 - len(indent))]
        if dataclasses.is_dataclass(default):
            lines += [f"{indent}{f.name}:", config_template(type(default), indent + "  ")]
        else:
            value = yaml.safe_dump(_plain(default), default_flow_style=True).removesuffix("\n...\n").strip()
            lines.append(f"{indent}{f.name}: {value}")
    return "\n".join(lines)
