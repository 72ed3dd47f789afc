"""Walking a YAML tree with errors that name the file, the key and the problem, e.g.
`configs/x.yaml: models[0].routes[1].weight: must be a number >= 0, got "ten"`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ConfigError(Exception):
    pass


class Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}")

    def section(self, data: Mapping[str, Any], name: str, path: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"{path}{name}", "must be a mapping")
        return value

    def known(self, data: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail(f"{path}{key}", f"unknown key (allowed: {', '.join(allowed)})")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        kind: type,
        default: Any,
        low: float | None = None,
        high: float | None = None,
    ) -> Any:
        value = data.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:
                raise self.fail(f"{path}{key}", "is out of range") from None
        if not ok:
            raise self.fail(f"{path}{key}", f"must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise self.fail(f"{path}{key}", f"must be a finite number, got {value!r}")
        if low is not None and value < low:
            raise self.fail(f"{path}{key}", f"must be >= {low:g}, got {value!r}")
        if high is not None and value > high:
            raise self.fail(f"{path}{key}", f"must be <= {high:g}, got {value!r}")
        return value


def dataclass_fields(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]


def simple_section(r: Reader, data: Mapping[str, Any], name: str, cls: type) -> Any:
    """A flat section whose keys are the fields of `cls`, typed by their defaults (numbers >= 0)."""
    section = r.section(data, name, "")
    r.known(section, f"{name}.", dataclass_fields(cls))
    defaults = cls()
    values = {}
    for key in dataclass_fields(cls):
        default = getattr(defaults, key)
        kind = type(default) if default is not None else str
        low = 0 if kind in (int, float) else None
        values[key] = r.get(section, key, f"{name}.", kind, default, low)
    return cls(**values)
