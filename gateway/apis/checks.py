"""Small checks of request fields shared by the translations: each bad value is a 400 naming it."""

from __future__ import annotations

from typing import Any

from gateway.core.errors import invalid

MAX_TOKENS = 1 << 24  # as gateway/core/request.py bounds max_tokens
MAX_NAME = 256
MAX_TOOLS = 512


def opt_str(body: dict[str, Any], name: str, limit: int | None = None, param: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or (limit is not None and len(value) > limit):
        bound = f" of at most {limit} characters" if limit is not None else ""
        raise invalid(f"'{param or name}' must be a string{bound}.", param=param or name)
    return value


def opt_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean.", param=name)
    return value


def opt_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def opt_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number from {low:g} to {high:g}.", param=name)
    return value


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_NAME:
        raise invalid(f"'model' is required: a string of 1 to {MAX_NAME} characters.", param="model")
    return model


def str_map(value: Any, name: str, keys: int, key_len: int, value_len: int) -> dict[str, str] | None:
    """OpenAI's `metadata`: at most `keys` string keys and string values, both bounded."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > keys
        or not all(isinstance(k, str) and len(k) <= key_len for k in value)
        or not all(isinstance(v, str) and len(v) <= value_len for v in value.values())
    ):
        raise invalid(
            f"'{name}' must be an object of at most {keys} string keys ({key_len} characters)"
            f" and string values ({value_len} characters).",
            param=name,
        )
    return value


def json_schema(value: Any, param: str) -> dict[str, Any]:
    """A tool's parameters: a JSON schema object (the engine or the model reads it)."""
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict):
        raise invalid(f"'{param}' must be a JSON schema object.", param=param)
    return value
