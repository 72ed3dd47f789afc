"""The narrow seam between serving code and an engine: serving talks only to this protocol."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engines.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class Slots:
    """Places in an engine's waiting queue, promised before a response starts (so a full engine
    answers 429 before the first byte), taken one by one as generation starts. `release` gives
    back what was not taken; it is idempotent."""

    __slots__ = ("_engine", "_left")

    def __init__(self, engine: Reserving, count: int) -> None:
        self._engine = engine
        self._left = count

    def take(self) -> None:
        if self._left > 0:
            self._left -= 1
            self._engine._unreserve(1)

    def release(self) -> None:
        if self._left > 0:
            self._engine._unreserve(self._left)
            self._left = 0


class Reserving(Protocol):
    def _unreserve(self, requests: int) -> None: ...


class Tokenizer(Protocol):
    eos_token_id: int | None

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class GenerationEngine(Protocol):
    context_length: int
    tokenizer_path: Path  # where a child process loads the same tokenizer from
    eos_token_ids: frozenset[int]

    @property
    def tokenizer(self) -> Tokenizer: ...

    def chat_prompt(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def reserve(self, requests: int) -> Slots:
        """Promises `requests` places in the waiting queue, or raises EngineError(429) at once."""
        ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, slots: Slots
    ) -> AsyncGenerator[list[int], None]:
        """Yields the newly generated token ids of each engine step until the request ends.

        Closing the iterator early aborts the request inside the engine and frees its slot. It
        takes one of `slots` (from `reserve`) as it joins the queue.
        """
        ...

    def stats(self) -> EngineStats: ...
