"""What the exchange sees of a translation: the engine's body, then the engine's answer turned
into the API's (whole, or SSE blocks in and out), with the usage and finish reason it read.

A translation runs in one of two modes, chosen per engine when the exchange has picked one:
translated (the engine gets a chat completions body; its chat answer is rewritten) or native
(the engine serves the API itself: the client's body goes through, the answer is only read for
its usage and relayed as it came). Subclasses implement both for one API.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

import orjson

from gateway.apis.chat import ChatStream
from gateway.core.errors import GatewayError

_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")
CHAT_PATH = "/v1/chat/completions"


def sse_events(block: bytes) -> list[bytes]:
    """The events of a block of complete SSE events (the separators dropped)."""
    events = block.split(b"\n\n") if b"\r" not in block else _EVENT_SPLIT.split(block)
    return [e for e in events if e]


def data_of(event: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (the first data line), or None."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # what engines send: one data line per event
    for line in event.splitlines():
        if line.startswith(b"data:"):
            return line[5:].lstrip()
    return None


class Translation(ABC):
    """One request's translation. `usage` is in chat's terms (prompt_tokens, completion_tokens),
    for the quota; `events` counts relayed token events, the fallback when no usage came."""

    api: str  # the metrics' and the log's `api` label
    native_path: str  # where an engine that serves the API itself takes it

    def __init__(self, original: dict[str, Any], chat: dict[str, Any], stream: bool) -> None:
        self.original = original  # the client's body (native mode), as checked
        self.chat = chat  # the same request as chat completions (translated mode)
        self.stream = stream
        self.native = False
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.events = 0
        self._chat_stream = ChatStream()

    def upstream(self, native: bool, upstream_model: str) -> tuple[str, bytes]:
        """The engine's path and body; `native` when the engine serves this API itself."""
        self.native = native
        if native:
            body = dict(self.original)
            body["model"] = upstream_model
            self.native_body(body)
            return self.native_path, orjson.dumps(body)
        chat = self.chat
        chat["model"] = upstream_model
        if self.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}  # exact accounting, and the API's usage
        return CHAT_PATH, orjson.dumps(chat)

    def native_body(self, body: dict[str, Any]) -> None:
        """Changes to the client's body before it goes to an engine that serves the API."""
        return None

    async def finished(self) -> None:
        """Called once the whole answer is known, before its last bytes leave (a stored
        response is written here: the client may ask for it the moment it has the answer)."""
        return None

    # Whole answers ----------------------------------------------------------------------

    def whole(self, status: int, content: bytes) -> bytes:
        if status != 200:
            return self.error_answer(status, content)
        try:
            answer = orjson.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            return content
        self.done = True
        if self.native:
            self.read_native(answer)
            return content
        self._chat_stream.whole(answer)
        self.usage = self._chat_stream.usage
        self.finish_reason = self._chat_stream.finish_reason
        return orjson.dumps(self.from_chat(self._chat_stream))

    def error_answer(self, status: int, content: bytes) -> bytes:
        """An engine's refusal (a 4xx), as the API words errors; OpenAI's shape by default."""
        return content

    @abstractmethod
    def read_native(self, answer: dict[str, Any]) -> None:
        """The usage (and what else is kept) of a native whole answer."""

    @abstractmethod
    def from_chat(self, chat: ChatStream) -> dict[str, Any]:
        """The API's answer from a whole chat answer, read into `chat`."""

    # Streams ----------------------------------------------------------------------------

    def open(self) -> bytes:
        """The first events, sent with the headers (none when native)."""
        return b"" if self.native else self.opening()

    def feed(self, block: bytes) -> bytes:
        """Complete SSE events from the engine -> the events for the client."""
        if self.native:
            return self.observe(block)
        out: list[bytes] = []
        cs = self._chat_stream
        piece = self.piece
        for event in block.split(b"\n\n") if b"\r" not in block else _EVENT_SPLIT.split(block):
            if not event:
                continue
            data = event[6:] if event.startswith(b"data: ") and b"\n" not in event else data_of(event)
            if data is None:
                continue
            if data == b"[DONE]":
                self.done = True
                self.usage, self.finish_reason = cs.usage, cs.finish_reason
                out.append(self.closing(cs))
                break
            try:
                chunk = orjson.loads(data)
            except ValueError:
                continue
            if type(chunk) is dict:
                for p in cs.feed(chunk):
                    self.events += 1
                    out.append(piece(p))
        return out[0] if len(out) == 1 else b"".join(out)

    @abstractmethod
    def opening(self) -> bytes: ...

    @abstractmethod
    def piece(self, piece: tuple[str, int, str]) -> bytes:
        """One delta of the chat stream: ("text", 0, text), ("tool", index, name) for a tool call
        that begins, ("args", index, json text) for its arguments."""

    @abstractmethod
    def closing(self, chat: ChatStream) -> bytes:
        """The last events, once the engine's stream ended."""

    @abstractmethod
    def observe(self, block: bytes) -> bytes:
        """Native mode: reads the usage and the end of the stream; returns the block as it came."""

    @abstractmethod
    def failed(self, error: GatewayError) -> bytes:
        """The API's error event, for a stream that broke after its headers left."""
