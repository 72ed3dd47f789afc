"""Every line of a batch's input file checked before the batch exists: all or nothing.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`;
the body must be a request the gateway would take on that endpoint (gateway/core/request.py parses
it, exactly as for an interactive request), without `stream: true`, for a model that exists and
that the batch's owner may use. `custom_id`s are unique within the file. Each bad line becomes
one `BatchError` naming its line number; a file with any is refused as a whole (the batch is
created `failed` with the errors, as OpenAI does).

The file is read twice from the store, once to check and once to feed `create_batch`, so memory
holds one line at a time plus the set of custom_ids (bounded by `batch.max_lines`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.batch.jsonl import numbered_lines
from gateway.core.errors import GatewayError
from gateway.core.request import Endpoint, parse_request
from gateway.core.text import has_control
from gateway.store import BatchError, NewLine

MAX_ERRORS = 1000  # listed in the batch's `errors`; the last entry counts the rest
MAX_CUSTOM_ID = 512

ModelCheck = Callable[[str], BatchError | None]
"""Returns the error for a model the batch may not use (unknown, or not allowed for the key)."""


class InvalidLine(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = BatchError(code, message, param)


@dataclass(frozen=True)
class LineRules:
    endpoint: Endpoint
    max_lines: int
    max_line_bytes: int
    check_model: ModelCheck


def check_line(data: bytes | None, rules: LineRules, seen: set[str]) -> NewLine:
    """One non-blank line -> the NewLine to store, or InvalidLine saying what is wrong."""
    if data is None:
        raise InvalidLine("line_too_large", f"The line is longer than {rules.max_line_bytes} bytes.")
    try:
        item = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidLine("invalid_json", f"The line is not valid JSON: {exc}.") from None
    if not isinstance(item, dict):
        raise InvalidLine("invalid_line", "The line must be a JSON object with custom_id, method, url and body.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID or has_control(custom_id):
        raise InvalidLine(
            "missing_custom_id",
            f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters without control characters.",
            "custom_id",
        )
    method = item.get("method")
    if method != "POST":
        raise InvalidLine("invalid_method", f"'method' must be \"POST\", got {_short(method)}.", "method")
    url = item.get("url")
    if url != rules.endpoint.path:
        raise InvalidLine(
            "invalid_url", f"'url' must be the batch's endpoint {rules.endpoint.path}, got {_short(url)}.", "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        raise InvalidLine("missing_body", "'body' must be the request as a JSON object.", "body")
    if body.get("stream") is True:
        raise InvalidLine("stream_not_supported", "Batch requests cannot stream: remove 'stream: true'.", "body.stream")
    try:
        raw = orjson.dumps(body)  # orjson writes at most 254 levels of nesting, reads 1024
        request = parse_request(raw, rules.endpoint)
    except orjson.JSONEncodeError:
        raise InvalidLine("invalid_body", "The body nests too deeply.", "body") from None
    except GatewayError as exc:
        raise InvalidLine("invalid_body", exc.message, f"body.{exc.param}" if exc.param else "body") from None
    error = rules.check_model(request.model)
    if error is not None:
        raise InvalidLine(error.code, error.message, "body.model")
    if custom_id in seen:
        raise InvalidLine(
            "duplicate_custom_id", f"The custom_id {custom_id!r} appears on an earlier line.", "custom_id"
        )
    seen.add(custom_id)
    return NewLine(custom_id, raw.decode())


async def validate_file(parts: AsyncIterable[bytes], rules: LineRules) -> list[BatchError]:
    """Every problem of the file, each naming its line (at most MAX_ERRORS, then a count)."""
    errors: list[BatchError] = []
    more = count = 0
    seen: set[str] = set()
    async for number, data in numbered_lines(parts, rules.max_line_bytes):
        if data is not None and not data.strip():
            continue
        count += 1
        if count > rules.max_lines:
            errors.append(
                BatchError(
                    "too_many_lines", f"The file has more than {rules.max_lines} requests, the limit.", line=number
                )
            )
            break
        try:
            check_line(data, rules, seen)
        except InvalidLine as exc:
            if len(errors) < MAX_ERRORS:
                errors.append(BatchError(exc.error.code, exc.error.message, exc.error.param, number))
            else:
                more += 1
    if more:
        errors.append(BatchError("too_many_errors", f"{more} more lines are invalid; fix the ones above first."))
    if count == 0:
        errors.append(BatchError("empty_file", "The input file has no requests."))
    return errors


async def valid_lines(parts: AsyncIterable[bytes], rules: LineRules) -> AsyncIterator[NewLine]:
    """The lines of a file that `validate_file` found valid, to store."""
    seen: set[str] = set()
    async for _, data in numbered_lines(parts, rules.max_line_bytes):
        if data is not None and not data.strip():
            continue
        yield check_line(data, rules, seen)


def _short(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode() if value is not None else "nothing"
    except orjson.JSONEncodeError:
        text = f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= 80 else text[:77] + "..."
