"""Parse once: a raw OpenAI request body becomes a typed, validated `ApiRequest`.

The gateway checks what it relies on itself (model, stream, the token counts it reserves, the
subject it routes by); every other field passes through to the engine untouched, and the engine
validates it. Nothing after this module reads the raw dict for those fields again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.bodies import json_object
from gateway.core.errors import invalid
from gateway.core.text import CONTROL

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
