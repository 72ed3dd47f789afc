"""The client's request: its body read within bounds, parsed once into a typed, validated
`ApiRequest`, and the client watched while the gateway works on it.

The gateway checks what it relies on itself (model, stream, the token counts it reserves, the
subject it routes by); every other field passes through to the engine untouched, and the engine
validates it. Nothing after this module reads the raw dict for those fields again. (The gateway
shares no code with the engine workers, which deploy alone, so these small ASGI pieces live here.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.text import CONTROL

# orjson reads up to 1024 levels of nesting but writes at most 254, and the body is written again
# (for the engine, in a captured payload, a batch line): deeper than this is a 400 here, not a
# failure later. Counting brackets is a cheap first look; only a body with that many is written
# once, inside enough lists that orjson's own limit falls at MAX_DEPTH (C speed: a Python walk of
# a 4 MB body of small lists would hold the event loop for a second).
MAX_DEPTH = 128
_ORJSON_MAX_DEPTH = 254


class ClientDisconnected(Exception):
    """The client went away: nobody is listening, so nothing is sent."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the limit of {limit} bytes.", code=Code.REQUEST_TOO_LARGE
    )


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit`, so a huge upload
    is never buffered in full. A client that hangs up while sending is ClientDisconnected."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or 400 `invalid_json`. orjson refuses lone surrogates, NaN and
    Infinity; nesting deeper than MAX_DEPTH is refused too: nothing Redis or the store cannot
    hold, nothing that cannot be written again."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}", code=Code.INVALID_JSON) from None
    check_depth(raw, value)
    return value


def check_depth(raw: bytes, value: Any) -> None:
    """A 400 for a JSON body (`raw`, parsed into `value`) nested deeper than MAX_DEPTH levels."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    padded = value
    for _ in range(_ORJSON_MAX_DEPTH - MAX_DEPTH):
        padded = [padded]
    try:
        orjson.dumps(padded)
    except orjson.JSONEncodeError:
        raise invalid(f"The request body nests deeper than {MAX_DEPTH} levels.") from None


def json_object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


class ClientWatch:
    """Watches the ASGI receive channel of a request whose body was read, and cancels the task
    that serves it the moment the client disconnects (or `drop()` gives up on it): that is what
    frees the engine slot at once. Polling `is_disconnected()` between steps would notice late.
    The served task turns the CancelledError into ClientDisconnected with `disconnected(exc)`.

    The watching task starts `WATCH_AFTER` seconds in (a timer is far cheaper than a task): most
    requests to a fast engine are answered before, and a disconnect is still noticed within that
    time of a request that lasts longer (an LLM's answer does), which then frees its engine slot.
    """

    __slots__ = ("_later", "_task", "_watcher", "cut", "gone")

    WATCH_AFTER = 0.05

    def __init__(self) -> None:
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None
        self.gone = False
        self.cut = False

    def start(self, receive: Receive | None) -> None:
        """Watches from now on; with no client (`receive` None: a batch line) there is nothing to
        watch, but the task can still be interrupted at shutdown."""
        self._task = asyncio.current_task()
        if receive is not None:
            self._later = asyncio.get_running_loop().call_later(self.WATCH_AFTER, self._begin, receive)

    def _begin(self, receive: Receive) -> None:
        self._later = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.drop()

    def drop(self) -> None:
        if not self.gone and self._task is not None:
            self.gone = True
            self._task.cancel()

    def interrupt(self) -> None:
        """Cancels the served task for a reason of the gateway's own (shutdown), not a disconnect;
        `interrupted(exc)` takes that cancellation back."""
        if not self.gone and not self.cut and self._task is not None:
            self.cut = True
            self._task.cancel()

    def interrupted(self, exc: BaseException | None) -> bool:
        if self.cut and isinstance(exc, asyncio.CancelledError) and self._task is not None:
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        """Stop watching: call it before the last send of a response, because the server reports
        a finished response as a disconnect too."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def disconnected(self, exc: BaseException | None) -> bool:
        """Whether `exc` means the client went away; a cancellation of this watch's doing is
        taken back (the task goes on to account for the request)."""
        if isinstance(exc, ClientDisconnected):
            return True
        if self.gone and isinstance(exc, asyncio.CancelledError) and self._task is not None:
            self._task.uncancel()
            return True
        return False


# Bounds on what one request may reserve: with them a reservation (prompt + max_tokens x n x
# prompts) stays far below 2**53, where Lua's numbers stop being exact.
MAX_TOKENS = 1 << 24
MAX_N = 128
MAX_PROMPTS = 2048
MAX_NAME = 256


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    kind: str  # chat, completions, embeddings, responses, messages, ...: the metrics' and the log's `api`
    prompt_field: str  # the field that carries the input: messages, prompt, input
    streams: bool


CHAT = Endpoint("/v1/chat/completions", "chat", "messages", True)
COMPLETIONS = Endpoint("/v1/completions", "completions", "prompt", True)
EMBEDDINGS = Endpoint("/v1/embeddings", "embeddings", "input", False)
ENDPOINTS = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}
GENERATING = frozenset({"chat", "completions", "responses", "messages"})  # the kinds that write tokens
# Translated to chat (gateway/apis/): the request's body is the chat body it became.
RESPONSES = Endpoint("/v1/responses", "responses", "messages", True)
MESSAGES = Endpoint("/v1/messages", "messages", "messages", True)


@dataclass(frozen=True, slots=True)
class BatchLine:
    """Which batch line a request runs, for its charge: a later run of the line replaces the
    earlier runs' charge (gateway/access/quota.py)."""

    batch_id: str
    line: int  # its position in the input
    claim: int  # the claim's number: each claim of the line in the store counts one up
    keep: int  # seconds its charge record outlives its run: a rerun must come within them


@dataclass(slots=True)
class ApiRequest:
    endpoint: Endpoint
    model: str
    body: dict[str, Any]  # the pass-through body; only the exchange writes to it (the engine body)
    stream: bool = False
    usage_wanted: bool = False  # the client asked for the usage chunk of a stream
    max_tokens: int | None = None
    n: int = 1
    prompts: int = 1  # a completions request may carry a batch of prompts
    subject: str | None = None  # the `user` field: who the request is for (sticky routing)
    batch_id: str | None = None  # set for the lines of a batch
    batch_line: BatchLine | None = None  # and which line, for its charge
    size: int = 0  # bytes of the raw body
    # A body that is not JSON (a multipart audio upload): its content type, and how to write it
    # for an upstream model name; None for every JSON request.
    content_type: bytes | None = None
    rewrite: Callable[[str], bytes] | None = field(default=None, repr=False)
    prompt_tokens: int | None = None  # counted once, by whoever needs it first (prompt bound, quota)
    _prefix: bytes | None = field(default=None, repr=False)

    @property
    def input(self) -> Any:
        return self.body[self.endpoint.prompt_field]

    def cap_max_tokens(self, limit: int) -> None:
        """Sets max_tokens where the client sent none, so a reservation bounds what it can spend."""
        if self.max_tokens is None and self.endpoint.kind in GENERATING:
            self.max_tokens = self.body["max_tokens"] = limit

    def prefix(self, chars: int) -> bytes | None:
        """The start of the prompt (system prompt and first turns for chat), for prefix affinity."""
        if self._prefix is None:
            self._prefix = _prefix_of(self.body, chars) or b""
        return self._prefix or None


def parse_request(raw: bytes, endpoint: Endpoint) -> ApiRequest:
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_NAME or CONTROL.search(model):
        raise invalid(
            f"'model' is required: a string of 1 to {MAX_NAME} characters without control characters.", param="model"
        )
    request = ApiRequest(endpoint, model, body, size=len(raw))
    _check_input(endpoint, body, request)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean.", param="stream")
    if stream and not endpoint.streams:
        raise invalid("This endpoint does not stream.", param="stream")
    request.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object.", param="stream_options")
        request.usage_wanted = options.get("include_usage") is True
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            request.max_tokens = _bounded_int(value, name, 1, MAX_TOKENS)
            break
    n = body.get("n")
    if n is not None:
        request.n = _bounded_int(n, "n", 1, MAX_N)
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str) or len(user) > MAX_NAME:
            raise invalid(f"'user' must be a string of at most {MAX_NAME} characters.", param="user")
        request.subject = user or None
    return request


def _check_input(endpoint: Endpoint, body: dict[str, Any], request: ApiRequest) -> None:
    name = endpoint.prompt_field
    value = body.get(name)
    if value is None:
        raise invalid(f"'{name}' is required.", param=name)
    if endpoint.kind == "chat":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise invalid("'messages' must be a non-empty array of message objects.", param=name)
        return
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise invalid(f"'{name}' must be a string or a non-empty array.", param=name)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return  # one prompt given as token ids
    if len(value) > MAX_PROMPTS:
        raise invalid(f"'{name}' may hold at most {MAX_PROMPTS} items.", param=name)
    for item in value:
        if not isinstance(item, str | list):
            raise invalid(f"'{name}' must hold strings or arrays of token ids.", param=name)
    request.prompts = len(value)


def _bounded_int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int subclass: `true` is not a count
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def _prefix_of(body: dict[str, Any], chars: int) -> bytes:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            text = content if isinstance(content, str) else str(content)
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
        return "\x1e".join(parts)[:chars].encode()
    prompt = body.get("prompt")
    return prompt[:chars].encode() if isinstance(prompt, str) else b""
