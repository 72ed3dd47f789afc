"""Answers in both shapes: one canonical form is stored (the whole JSON body an engine sends for
`stream: false`), replayed whole or as an SSE stream; a streamed answer is folded into that form
before it is stored. Only plain text answers convert (content or text, a finish reason, usage):
an answer with tool calls, logprobs or other delta fields is not folded (it is not cached when
streamed) and not unfolded (a stream asking for it is a miss, and the engine answers)."""

from __future__ import annotations

from typing import Any

import orjson

_PLAIN_DELTA = frozenset({"role", "content"})


def fold_stream(sse: bytes, chat: bool, usage: dict[str, Any] | None) -> bytes | None:
    """The whole answer that a relayed stream (its client-side bytes) stands for, or None."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    head: dict[str, Any] | None = None
    for line in sse.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            chunk = orjson.loads(line[6:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or "error" in chunk:
            return None
        head = head or chunk
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("logprobs") is not None:
                return None
            index = choice.get("index", 0)
            if not isinstance(index, int):
                return None
            if chat:
                delta = choice.get("delta") or {}
                if not isinstance(delta, dict) or not delta.keys() <= _PLAIN_DELTA:
                    return None
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if piece is not None and not isinstance(piece, str):
                return None
            texts.setdefault(index, []).append(piece or "")
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
    if head is None or not texts or any(i not in finish for i in texts):
        return None  # an answer without its end is not one to replay
    choices = []
    for i in sorted(texts):
        text = "".join(texts[i])
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish[i],
                }
            )
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish[i]})
    whole = {
        "id": head.get("id"),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": choices,
        "usage": usage,
    }
    return orjson.dumps(whole)


def unfold(whole: dict[str, Any], chat: bool, with_usage: bool) -> bytes | None:
    """A stored whole answer as the SSE stream an engine would have sent, or None."""
    choices = whole.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": whole.get("id"), "object": kind, "created": whole.get("created"), "model": whole.get("model")}
    events: list[bytes] = []
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("logprobs") is not None:
            return None
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message")
            if not isinstance(message, dict) or any(message.get(k) for k in message.keys() - {"role", "content"}):
                return None
            text = message.get("content")
            first = {"index": index, "delta": {"role": "assistant", "content": text or ""}, "finish_reason": None}
            last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        else:
            text = choice.get("text")
            first = {"index": index, "text": text or "", "finish_reason": None}
            last = {"index": index, "text": "", "finish_reason": choice.get("finish_reason")}
        if text is not None and not isinstance(text, str):
            return None
        events.append(_event({**base, "choices": [first]}))
        events.append(_event({**base, "choices": [last]}))
    usage = whole.get("usage")
    if with_usage and isinstance(usage, dict):
        events.append(_event({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"
