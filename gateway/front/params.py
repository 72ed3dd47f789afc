"""Identifiers, cursors and names from the URL, checked before any route hands them on.

Every query parameter of every request is checked once in the front middleware (`check_query`):
no control characters in a name or a value. Path parameters are checked where a route reads them
(`path_id`), so the 400 names the parameter as the route calls it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import Scope

from gateway.core.errors import invalid
from gateway.core.text import MAX_ID, check_text, escape_controls, has_control


def path_id(request: Request, name: str, max_chars: int = MAX_ID) -> str:
    """A path parameter: 1 to `max_chars` characters, no control characters (else a 400 naming it)."""
    return check_text(str(request.path_params[name]), name, max_chars)


def query_id(request: Request, name: str, max_chars: int = MAX_ID) -> str | None:
    """An optional query parameter held to the same rule; empty counts as absent."""
    value = request.query_params.get(name)
    return check_text(value, name, max_chars) if value else None


def check_query(scope: Scope) -> None:
    """Raises a 400 naming the first query parameter whose name or value holds a control character."""
    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return
    # Parsed as Starlette parses it (latin-1 text, then %-decoded as UTF-8)
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if has_control(name) or has_control(value):
            param = escape_controls(name)
            raise invalid(f"The query parameter '{param}' holds control characters.", param=param)
