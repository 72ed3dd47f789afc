"""Streams that survive their engine: what a broken stream had sent, and the request that goes on
from there on another engine.

While a stream is relayed, the relay keeps references to the blocks it sent (`Transcript`: no
copy, no parsing; bounded by `MAX_KEPT_BYTES` per stream, past which the stream can no longer be
resumed and ends with an error event as before). Only when the engine fails after the first byte
(connection reset or closed, a read timeout, an in-band error event, the engine taken out of the
pool) are they parsed (`read_transcript`), and the request is sent again as its continuation
(`continuation`):
- chat: the messages plus an assistant message holding the text so far, with
  `continue_final_message: true` and `add_generation_prompt: false` (vLLM's switches; the CPU
  engine has the same);
- completions: the prompt plus the text so far (`echo` off, or the prompt would come twice);
- `max_tokens` less the tokens already sent.
The continuation's events reach the client as the same stream (`Splice`): the original id in
every event, and one final usage: the prompt once, the completion tokens as sent.

Not resumed (the stream ends with an error event, as before): n > 1, prompts given as token ids or
several prompts, tool calls or logprobs in flight (a partial call cannot be continued as text),
a transcript past its bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_KEPT_BYTES = 1 << 20  # per stream: about 5,000 tokens of events
_DATA = b"data: "
_EVENTS = re.compile(rb"\r?\n\r?\n")


@dataclass(slots=True)
class Transcript:
    """The blocks of events sent to the client so far, as the relay sent them."""

    limit: int = MAX_KEPT_BYTES
    blocks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False

    def keep(self, block: bytes) -> None:
        if self.overflow:
            return
        self.size += len(block)
        if self.size > self.limit:
            self.overflow = True
            self.blocks.clear()  # nothing to resume from any more: let it go
        else:
            self.blocks.append(block)


@dataclass(slots=True)
class SoFar:
    """What the client has been sent, read back from a transcript."""

    id: str | None = None
    text: str = ""
    tokens: int = 0  # events that carried text: one token each, as engines stream them
    finish_reason: str | None = None
    resumable: bool = True


def read_transcript(blocks: list[bytes], chat: bool) -> SoFar:
    so_far = SoFar()
    parts: list[str] = []
    for block in blocks:
        for event in _EVENTS.split(block):
            if not event.startswith(_DATA):
                continue
            try:
                payload = orjson.loads(event[len(_DATA) :])
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            if so_far.id is None and isinstance(payload.get("id"), str):
                so_far.id = payload["id"]
            choices = payload.get("choices")
            if not isinstance(choices, list) or not choices:
                continue
            if len(choices) > 1 or not isinstance(choices[0], dict) or choices[0].get("index", 0) != 0:
                so_far.resumable = False
                continue
            choice = choices[0]
            if choice.get("logprobs"):
                so_far.resumable = False
            piece: Any
            if chat:
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    continue
                if delta.get("tool_calls") or delta.get("function_call"):
                    so_far.resumable = False
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if isinstance(piece, str) and piece:
                parts.append(piece)
                so_far.tokens += 1
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                so_far.finish_reason = reason
    so_far.text = "".join(parts)
    return so_far


def continuation(body: dict[str, Any], chat: bool, so_far: SoFar, max_tokens: int | None) -> dict[str, Any] | None:
    """The request that goes on from `so_far`; None when it cannot be resumed, or needs nothing more."""
    if not so_far.resumable or so_far.finish_reason is not None:
        return None
    if body.get("n", 1) != 1:
        return None
    left = None if max_tokens is None else max_tokens - so_far.tokens
    if left is not None and left < 1:
        return None
    follow = dict(body)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        follow["messages"] = [*messages, {"role": "assistant", "content": so_far.text}]
        follow["continue_final_message"] = True
        follow["add_generation_prompt"] = False
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return None  # token ids or several prompts
        follow["prompt"] = prompt + so_far.text
        follow["echo"] = False
    if left is not None:
        for name in ("max_completion_tokens", "max_tokens"):
            if name in follow:
                follow[name] = left
        if "max_completion_tokens" not in follow:
            follow["max_tokens"] = left
    return follow


class Splice:
    """Makes a continuation's events read as the stream they continue: the original id in every
    event, and its usage as the client's whole request used it."""

    __slots__ = ("_new_id", "_old_id", "_prompt_tokens", "_sent")

    def __init__(self, so_far: SoFar, prompt_tokens: int | None) -> None:
        self._old_id = so_far.id.encode() if so_far.id else None
        self._new_id: bytes | None = None
        self._sent = so_far.tokens
        self._prompt_tokens = prompt_tokens  # as counted at admission, when it was

    def __call__(self, block: bytes) -> bytes:
        if self._new_id is None and self._old_id is not None:
            self._new_id = _first_id(block) or b""
        if self._new_id and self._old_id and self._new_id != self._old_id:
            block = block.replace(self._new_id, self._old_id)
        if b'"usage"' in block:
            block = b"\n\n".join(self._fix_usage(e) for e in block.split(b"\n\n"))
        return block

    def _fix_usage(self, event: bytes) -> bytes:
        if b'"usage"' not in event or not event.startswith(_DATA):
            return event
        try:
            payload = orjson.loads(event[len(_DATA) :])
        except ValueError:
            return event
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return event
        try:
            reported_prompt = int(usage.get("prompt_tokens") or 0)
            completion = self._sent + int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            return event
        # The continuation's prompt holds the text already sent: count it once, as completion.
        prompt = self._prompt_tokens if self._prompt_tokens is not None else max(0, reported_prompt - self._sent)
        payload["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion}
        payload["usage"]["total_tokens"] = prompt + completion
        payload["usage"].pop("prompt_tokens_details", None)
        return _DATA + orjson.dumps(payload)


def _first_id(block: bytes) -> bytes | None:
    for event in _EVENTS.split(block):
        if event.startswith(_DATA):
            try:
                payload = orjson.loads(event[len(_DATA) :])
            except ValueError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("id"), str):
                return str(payload["id"]).encode()
    return None
