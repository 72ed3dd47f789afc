"""The running configuration as JSON for `GET /admin/config` and the console: every section as
the gateway reads it (defaults filled in, the environment applied), with its secrets masked.

Masked: the admin key, the OIDC client secret, the alert webhook's signing secret, engines'
API keys and the values of their environment, the tracing collector's headers, and the password
of any URL (Redis, the store). A masked value that is set shows as "***", so one can still see
that it is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.settings import SECTIONS, Settings

MASK = "***"
SECRET_FIELDS = frozenset({"admin_key", "api_key", "client_secret", "secret"})
SECRET_VALUES = frozenset({"env", "headers"})  # mappings whose values are masked, their names kept
URL_FIELDS = frozenset({"url"})


def masked(settings: Settings) -> dict[str, Any]:
    return {name: _value(name, getattr(settings, name)) for name in SECTIONS}


def _value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in SECRET_FIELDS:
        return MASK
    if name in SECRET_VALUES:
        pairs = value.items() if isinstance(value, Mapping) else value
        return {str(k): MASK for k, _ in pairs}
    if name in URL_FIELDS and isinstance(value, str):
        return without_password(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _value(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _value(str(k), v) for k, v in value.items()}
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else value
        return [_value("", v) for v in items]
    if isinstance(value, Path):
        return str(value)
    return value


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}"))
