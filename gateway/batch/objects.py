"""File and Batch objects as OpenAI's API renders them, and the completion window's spelling.

The official SDK parses these into `openai.types.FileObject` and `openai.types.Batch`; field
names, types and nullability follow those types.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.core.errors import invalid
from gateway.store import Batch, FileRecord

# What a client may upload; `batch_output` is the gateway's own (result files).
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_COMPLETION_WINDOW = 30 * 86400
_WINDOW = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "expires_at": None,
        "status_details": None,
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    errors = None
    if batch.errors:
        errors = {
            "object": "list",
            "data": [{"code": e.code, "message": e.message, "param": e.param, "line": e.line} for e in batch.errors],
        }
    counts = batch.request_counts
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": format_window(batch.completion_window),
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": batch.metadata,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def parse_window(value: Any, minimum: int) -> int:
    """`"24h"` -> 86400. OpenAI accepts only "24h"; the gateway accepts any `<n>s|m|h|d` from
    `minimum` (config `batch.min_completion_window`, 24 h by default) up to 30 days."""
    match = _WINDOW.match(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not match or not minimum <= seconds <= MAX_COMPLETION_WINDOW:
        shortest = format_window(minimum)
        raise invalid(
            f"'completion_window' must be a duration such as \"24h\", from {shortest} to 30d; got {value!r}.",
            param="completion_window",
        )
    return seconds


def format_window(seconds: int) -> str:
    """In hours where it can be, as OpenAI spells its one window ("24h")."""
    for unit in ("h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def check_metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return None
    ok = isinstance(value, dict) and len(value) <= MAX_METADATA_PAIRS
    ok = ok and all(
        isinstance(k, str) and len(k) <= MAX_METADATA_KEY and isinstance(v, str) and len(v) <= MAX_METADATA_VALUE
        for k, v in value.items()
    )
    if not ok:
        raise invalid(
            "'metadata' must be an object of at most 16 string values (keys up to 64 characters, values up to 512).",
            param="metadata",
        )
    return dict(value)
