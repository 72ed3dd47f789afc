"""What an admin may set on an API key: validation of `POST`/`PATCH /admin/keys` payloads (and the
checks teams and organizations share with keys: gateway/access/team_fields.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from typing import Any

import orjson

from gateway.access.base import PRIORITIES
from gateway.core.errors import invalid
from gateway.core.times import parse_time

LIMITS = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens")
BUDGETS = ("daily_budget", "monthly_budget")  # money, in the pricing currency (stored in nano-units)
SCHEDULING = ("priority", "weight")  # the key's band and share when engines are full (gateway/dispatch/scheduler.py)
FIELDS = ("name", "models", *LIMITS, *BUDGETS, "expires_at", "metadata", *SCHEDULING, "team")
MAX_LIMIT = 2**53 - 1  # Lua numbers are doubles: stay exact
MAX_BUDGET = 1_000_000_000.0  # in currency units: 1e18 nano-units, inside Redis's 64-bit counters
NANOS = 1_000_000_000
MAX_WEIGHT = 1_000_000
MAX_METADATA_ENTRIES = 50
MAX_METADATA_CHARS = 16_384


def validate_key_fields(payload: Any, *, partial: bool, known_models: Collection[str] | None = None) -> dict[str, Any]:
    """An admin payload -> clean fields (models as a tuple, expires_at as unix seconds).

    `known_models`, when given, are the public model names: a key may only be limited to those.
    """
    if not isinstance(payload, dict):
        raise invalid("The request body must be a JSON object.")
    for name in payload:
        if name not in FIELDS:
            raise invalid(f"Unknown field {name!r}; expected some of: {', '.join(FIELDS)}.", param=str(name))
    if not partial and "name" not in payload:
        raise invalid("'name' is required.", param="name")
    out: dict[str, Any] = {}
    for name, value in payload.items():
        out[name] = _CHECKS[name](name, value)
    models = out.get("models")
    if models is not None and known_models is not None:
        unknown = [m for m in models if m not in known_models]
        if unknown:
            raise invalid(
                f"'models' names models nobody serves: {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(sorted(known_models))}).",
                param="models",
            )
    return out


def _text(value: Any, longest: int) -> bool:
    """A string of 1 to `longest` characters that is valid Unicode (no lone surrogates)."""
    if not isinstance(value, str) or not 1 <= len(value) <= longest:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _name(param: str, value: Any) -> str:
    if not _text(value, 200):
        raise invalid("'name' must be a string of 1 to 200 characters.", param=param)
    return str(value)


def _models(param: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value or len(value) > 1000:
        raise invalid("'models' must be a non-empty list of model names, or null for all models.", param=param)
    if not all(_text(m, 256) for m in value):
        raise invalid("'models' must contain only model names (strings of 1 to 256 characters).", param=param)
    return tuple(dict.fromkeys(value))


def _limit(param: str, value: Any) -> int | None:
    if value is None:
        return None
    # bool is an int subclass: `true` is not a limit
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{param}' must be an integer >= 1, or null for no limit.", param=param)
    if value < 1:
        raise invalid(f"'{param}' must be >= 1 (got {value}); use null for no limit.", param=param)
    if value > MAX_LIMIT:
        raise invalid(f"'{param}' must be at most {MAX_LIMIT}.", param=param)
    return value


def _budget(param: str, value: Any) -> int | None:
    """A money amount > 0 -> nano-units (an int, so Redis and Lua compare it exactly)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"'{param}' must be a number > 0 (in the pricing currency), or null for no budget.", param=param)
    if not 0 < value <= MAX_BUDGET:
        raise invalid(f"'{param}' must be > 0 and at most {MAX_BUDGET:.0f}; use null for no budget.", param=param)
    return max(1, round(value * NANOS))


TEAM_ID = re.compile(r"team_[0-9a-f]{16}")


def _team(param: str, value: Any) -> str | None:
    if value is None:
        return None  # no team
    if not isinstance(value, str) or not TEAM_ID.fullmatch(value):
        raise invalid("'team' must be a team id (team_ and 16 hex digits), or null for no team.", param=param)
    return value


def _expires_at(param: str, value: Any) -> float | None:
    return None if value is None else parse_time(value, param)


def _metadata(param: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("'metadata' must be a JSON object.", param=param)
    if len(value) > MAX_METADATA_ENTRIES:
        raise invalid(f"'metadata' may have at most {MAX_METADATA_ENTRIES} entries.", param=param)
    try:
        # Refuses what cannot round-trip through Redis: NaN, lone surrogates, deep nesting.
        text = json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
        orjson.dumps(value)  # what the key store writes: it stops at 254 levels, json at ~1000
    except (TypeError, ValueError, RecursionError):
        raise invalid("'metadata' must be plain JSON: objects, arrays, strings, finite numbers.", param=param) from None
    if len(text) > MAX_METADATA_CHARS:
        raise invalid(f"'metadata' must serialise to at most {MAX_METADATA_CHARS} bytes.", param=param)
    return dict(value)


def _priority(param: str, value: Any) -> str | None:
    if value is None:
        return None  # the default, normal
    if value not in PRIORITIES:
        raise invalid(f"'priority' must be one of {', '.join(PRIORITIES)}, or null for normal.", param=param)
    return str(value)


def _weight(param: str, value: Any) -> float | None:
    if value is None:
        return None  # the default, 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WEIGHT:
        raise invalid(f"'weight' must be a number > 0 and <= {MAX_WEIGHT}, or null for 1.", param=param)
    return float(value)


_CHECKS: dict[str, Any] = {
    "name": _name,
    "models": _models,
    **dict.fromkeys(LIMITS, _limit),
    **dict.fromkeys(BUDGETS, _budget),
    "team": _team,
    "expires_at": _expires_at,
    "metadata": _metadata,
    "priority": _priority,
    "weight": _weight,
}
