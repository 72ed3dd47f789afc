"""Anthropic's Messages API over chat completions: the message, its SSE events, its errors.

Translated, a chat answer becomes a message whose `content` holds a text block and a
`tool_use` block per tool call, with chat's finish reason as Anthropic's stop_reason (stop:
end_turn, length: max_tokens, tool_calls: tool_use). A stream becomes message_start, ping, per
block content_block_start / content_block_delta (text_delta, input_json_delta) /
content_block_stop, then message_delta (stop_reason, usage) and message_stop, each with its
`event:` line. Errors everywhere on /v1/messages* take Anthropic's shape and types:
`{"type": "error", "error": {"type", "message"}}`, overload as 529 overloaded_error.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.base import Translation, data_of, sse_events
from gateway.apis.chat import ChatStream, new_id, tokens
from gateway.apis.messages_input import MessagesRequest
from gateway.core.errors import Code, GatewayError

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}

# Our status -> Anthropic's (status, error type). Anthropic has no 502/503: an engine failing is
# its api_error (500), no engine to take the request is overloaded_error (529).
_ERRORS = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    405: (405, "invalid_request_error"),
    408: (408, "timeout_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    431: (431, "request_too_large"),
    500: (500, "api_error"),
    502: (500, "api_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
_OVERLOADED = frozenset({Code.ENGINES_OVERLOADED, Code.NO_HEALTHY_ENGINE, Code.ENGINE_STARTING})


class AnthropicError(GatewayError):
    """A GatewayError worded as Anthropic does; the status mapped to Anthropic's."""

    def __init__(self, error: GatewayError) -> None:
        status, kind = _ERRORS.get(error.status, (500, "api_error"))
        if error.code in _OVERLOADED:
            status, kind = 529, "overloaded_error"
        super().__init__(status, error.message, code=error.code, param=error.param, type=kind, headers=error.headers)

    def body(self) -> dict[str, object]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def sse(self) -> bytes:
        return b"event: error\ndata: " + self.payload() + b"\n\n"


def anthropic(error: GatewayError) -> AnthropicError:
    return error if isinstance(error, AnthropicError) else AnthropicError(error)


class MessagesTranslation(Translation):
    api = "messages"
    native_path = "/v1/messages"

    def __init__(self, request: MessagesRequest) -> None:
        super().__init__(request.body, request.chat, request.stream)
        self.request = request
        self.id = new_id("msg_")
        self._block = -1  # the index of the open content block; -1: none
        self._text_open = False
        self._tool_blocks: dict[int, int] = {}  # chat tool index -> content block index
        self._input_tokens = 0  # native streams: from message_start

    def error_answer(self, status: int, content: bytes) -> bytes:
        try:
            message = orjson.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"The engine answered {status}."
        if not isinstance(message, str):
            message = str(message)
        return AnthropicError(GatewayError(status, message)).payload()

    def _stop_reason(self) -> str:
        return STOP_REASONS.get(self.finish_reason or "stop", "end_turn")

    def from_chat(self, chat: ChatStream) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if chat.text or not chat.tools:
            content.append({"type": "text", "text": chat.content})
        for tool in chat.tools:
            content.append({"type": "tool_use", "id": tool.id, "name": tool.name, "input": _arguments(tool.arguments)})
        prompt, completion = tokens(self.usage)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": content,
            "stop_reason": self._stop_reason(),
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }

    def read_native(self, answer: dict[str, Any]) -> None:
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
        reason = answer.get("stop_reason")
        self.finish_reason = "length" if reason == "max_tokens" else "tool_calls" if reason == "tool_use" else "stop"

    # Streams --------------------------------------------------------------------------------

    @staticmethod
    def _event(kind: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"

    def opening(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return self._event("message_start", {"message": message}) + self._event("ping", {})

    def piece(self, piece: tuple[str, int, str]) -> bytes:
        kind, index, text = piece
        if kind == "text":
            out = b""
            if not self._text_open:
                out = self._stop_block()
                self._block += 1
                self._text_open = True
                out += self._event(
                    "content_block_start", {"index": self._block, "content_block": {"type": "text", "text": ""}}
                )
            # The hot path, one event per token: the JSON written around the text alone.
            return (
                out
                + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":'
                % self._block
                + orjson.dumps(text)
                + b"}}\n\n"
            )
        if kind == "tool":
            out = self._stop_block()
            self._text_open = False
            self._block += 1
            self._tool_blocks[index] = self._block
            tool = self._chat_stream.tools[index]
            block = {"type": "tool_use", "id": tool.id, "name": text, "input": {}}
            return out + self._event("content_block_start", {"index": self._block, "content_block": block})
        block_index = self._tool_blocks.get(index)
        if block_index is None:
            return b""
        delta = {"type": "input_json_delta", "partial_json": text}
        return self._event("content_block_delta", {"index": block_index, "delta": delta})

    def _stop_block(self) -> bytes:
        return b"" if self._block < 0 else self._event("content_block_stop", {"index": self._block})

    def closing(self, chat: ChatStream) -> bytes:
        out = self._stop_block()
        prompt, completion = tokens(self.usage)
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        out += self._event(
            "message_delta", {"delta": delta, "usage": {"input_tokens": prompt, "output_tokens": completion}}
        )
        return out + self._event("message_stop", {})

    def observe(self, block: bytes) -> bytes:
        self.events += block.count(b"content_block_delta") // 2  # the event line and the data
        if b"message_start" in block or b"message_delta" in block or b"message_stop" in block:
            for event in sse_events(block):
                data = data_of(event)
                if data is None:
                    continue
                if b'"message_start"' in data or b'"message_delta"' in data:
                    self._native_event(data)
                elif b'"message_stop"' in data:
                    self.done = True
        return block

    def _native_event(self, data: bytes) -> None:
        try:
            payload = orjson.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if payload.get("type") == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int):
                self._input_tokens = usage["input_tokens"]
        elif payload.get("type") == "message_delta":
            usage = payload.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            prompt = usage.get("input_tokens") if isinstance(usage.get("input_tokens"), int) else self._input_tokens
            self.usage = {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens")}
            delta = payload.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            self.finish_reason = (
                "length" if reason == "max_tokens" else "tool_calls" if reason == "tool_use" else "stop"
            )

    def failed(self, error: GatewayError) -> bytes:
        return anthropic(error).sse()


def _arguments(text: str) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is; {} when not JSON."""
    try:
        value = orjson.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
