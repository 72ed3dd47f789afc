"""Reads a chat completions answer, whole or chunk by chunk, into what both translations need:
the text, the tool calls (id, name, arguments), the finish reason and the usage. Only the first
choice is read: the translated APIs have one answer per request."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


# Ids of responses, items and messages: 24 hex characters, a random per-process part and a
# counter (unique across replicas, and no system call per id; several ids are made per request).
_ID_PREFIX = os.urandom(8).hex()
_numbers = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}{_ID_PREFIX}{next(_numbers):08x}"


class ChatStream:
    __slots__ = ("finish_reason", "text", "tools", "usage")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tools: list[ToolCall] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def whole(self, answer: dict[str, Any]) -> None:
        usage = answer.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        reason = choice.get("finish_reason")
        self.finish_reason = reason if isinstance(reason, str) else None
        message = choice.get("message")
        if not isinstance(message, dict):
            return
        content = message.get("content")
        if isinstance(content, str) and content:
            self.text.append(content)
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                self.tools.append(
                    ToolCall(
                        _str(call.get("id")) or new_id("call_"),
                        _str(function.get("name")),
                        _str(function.get("arguments")) or "{}",
                    )
                )

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, int, str]]:
        """The pieces of one chunk: ("text", 0, text), ("tool", i, name) when tool call i begins,
        ("args", i, text) for its arguments."""
        usage = chunk.get("usage")
        if usage is not None and type(usage) is dict:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or type(choices) is not list:
            return []
        choice = choices[0]
        if type(choice) is not dict:
            return []
        reason = choice.get("finish_reason")
        if reason and type(reason) is str:
            self.finish_reason = reason
        delta = choice.get("delta")
        if type(delta) is not dict:
            return []
        content = delta.get("content")
        calls = delta.get("tool_calls")
        if calls is None:  # the common chunk: text alone
            if content and type(content) is str:
                self.text.append(content)
                return [("text", 0, content)]
            return []
        pieces: list[tuple[str, int, str]] = []
        if content and type(content) is str:
            self.text.append(content)
            pieces.append(("text", 0, content))
        if type(calls) is list:
            pieces += self._calls(calls)
        return pieces

    def _calls(self, calls: list[Any]) -> Iterator[tuple[str, int, str]]:
        for call in calls:
            if not isinstance(call, dict):
                continue
            index = call.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                index = len(self.tools) - 1 if self.tools else 0
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            if index >= len(self.tools):
                if index != len(self.tools):
                    continue  # a gap in the indexes: not a stream we can follow
                tool = ToolCall(_str(call.get("id")) or new_id("call_"), _str(function.get("name")), "")
                self.tools.append(tool)
                yield "tool", index, tool.name
            args = function.get("arguments")
            if isinstance(args, str) and args:
                self.tools[index].arguments += args
                yield "args", index, args

    @property
    def content(self) -> str:
        return "".join(self.text)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a chat usage, 0 where missing or malformed."""
    if not usage:
        return 0, 0
    out = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name)
        out.append(value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0)
    return out[0], out[1]
