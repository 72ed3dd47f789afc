"""Times in the admin API: ISO 8601 or Unix seconds in, ISO 8601 (UTC, `Z`) out."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from gateway.core.errors import invalid

MAX_TIMESTAMP = 253_402_300_799.0  # 9999-12-31T23:59:59Z


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    spec = "seconds" if ts == int(ts) else "milliseconds"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def parse_time(value: Any, param: str) -> float:
    """ISO 8601 (a naive one is UTC) or Unix seconds, as a number or a string of digits."""
    if isinstance(value, str):
        text = value.strip()
        try:
            ts = float(text) if text.replace(".", "", 1).isdigit() else _iso_seconds(text)
        except ValueError:
            raise invalid(
                f"'{param}' is not an ISO 8601 date-time or Unix seconds: {value!r} (e.g. 2030-01-31T12:00:00Z).",
                param=param,
            ) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError:
            raise invalid(f"'{param}' is out of range.", param=param) from None
    else:
        raise invalid(f"'{param}' must be an ISO 8601 string or Unix seconds.", param=param)
    if not math.isfinite(ts) or not 0 <= ts <= MAX_TIMESTAMP:
        raise invalid(f"'{param}' is out of range.", param=param)
    return ts


def _iso_seconds(text: str) -> float:
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
