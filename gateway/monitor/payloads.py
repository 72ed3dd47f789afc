"""Sampled payload capture for the inference log: what a request sent and what came back, redacted.

On the request path only the decision and the copying happen: a sampled request's `send` is
wrapped to keep the bytes the client got (up to `max_bytes`). Parsing, redaction and encoding
happen later, in the log's writer task (`payload_json`), never while the client waits.

The captured payload is JSON text:
`{"request": <the body as sent to the engine>, "response": <the JSON answer>}` for a whole
answer, `{"request": ..., "events": [<each SSE data event, parsed>]}` for a stream, plus
`"truncated": true` when the response was longer than `max_bytes`. An answer that is not JSON is
kept as a string. Redaction (see gateway/settings/inference_log.py) applies to both sides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson
from starlette.types import Message, Send

from gateway.settings import PayloadCapture

REDACTED = "[redacted]"
_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")


class Capture:
    """The bytes one sampled request got back, and the body it sent."""

    __slots__ = ("body", "chunks", "limit", "size", "truncated")

    def __init__(self, body: Any, limit: int) -> None:
        self.body = body  # the request's pass-through dict; nothing writes to it after the relay
        self.chunks: list[bytes] = []
        self.limit = limit
        self.size = 0
        self.truncated = False

    def wrap(self, send: Send) -> Send:
        async def capturing(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.add(message.get("body", b""))
            await send(message)

        return capturing

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) > room:
            data, self.truncated = data[: max(room, 0)], True
        if data:
            self.chunks.append(data)
            self.size += len(data)


class Redactor:
    def __init__(self, fields: Collection[str], patterns: Sequence[re.Pattern[str]]) -> None:
        self._fields = frozenset(fields)
        self._patterns = tuple(patterns)

    @classmethod
    def of(cls, capture: PayloadCapture) -> Redactor:
        return cls(capture.fields, capture.patterns)

    def __call__(self, value: Any) -> Any:
        """A redacted copy of a JSON value; the original is left as it is."""
        if isinstance(value, dict):
            return {k: REDACTED if k in self._fields else self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str):
            for pattern in self._patterns:
                value = pattern.sub(REDACTED, value)
        return value


def payload_json(capture: Capture, stream: bool, redact: Callable[[Any], Any]) -> str:
    raw = b"".join(capture.chunks)
    doc: dict[str, Any] = {"request": redact(capture.body)}
    if stream:
        doc["events"] = [redact(e) for e in _events(raw, capture.truncated)]
    else:
        doc["response"] = redact(_json_or_text(raw)) if raw else None
    if capture.truncated:
        doc["truncated"] = True
    return orjson.dumps(doc).decode()


def _events(raw: bytes, truncated: bool) -> list[Any]:
    events: list[Any] = []
    for event in _EVENT_SPLIT.split(raw):
        for line in event.splitlines():
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data and data != b"[DONE]":
                    events.append(_json_or_text(data))
    if truncated and events and isinstance(events[-1], str):
        events.pop()  # the event the cut went through
    return events


def _json_or_text(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
