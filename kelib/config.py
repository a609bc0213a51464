"""Plain-data configuration: YAML files loaded into typed dataclasses, strictly.

Defaults live in one place, the dataclass fields. A key the dataclass does not know is an error that
names the file and the known keys (a typo must never silently fall back to a default), and values are
checked against the field's type (``Literal`` choices included).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or dict that does not match its dataclass."""


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values.

    Args:
        cls: a dataclass type; nested dataclass fields are built recursively.
        data: the mapping (e.g. parsed YAML). ``None`` means all defaults.
        where: a label for error messages (file name, key path).
    """
    data = dict(data or {})
    label = where or cls.__name__
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{label}: unknown key(s) {unknown}; known keys of {cls.__name__}: {sorted(fields)}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{label}.{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{label}: missing required key(s) {missing}")
    return cls(**kwargs)


def load_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load ``path`` (optionally one top-level ``section`` of it) into ``cls``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: no section {section!r} (sections: {sorted(data)})")
        data = data[section]
    return from_dict(cls, data, where=f"{path}" + (f":{section}" if section else ""))


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (for provenance records and cache keys)."""
    return dataclasses.asdict(obj)


def _coerce(value: Any, hint: Any, label: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, label)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{label}: {value!r} matches none of {hint}: {errors}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{label}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{label}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where=label)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool):
            raise ConfigError(f"{label}: expected int, got {value!r}")
        if not isinstance(value, hint):
            raise ConfigError(f"{label}: expected {hint.__name__}, got {value!r}")
    return value
