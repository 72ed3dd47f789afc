"""The narrow seam between serving code and an engine: serving talks only to this protocol."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
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


class Tokenizer(Protocol):
    eos_token_id: int | None

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class GenerationEngine(Protocol):
    context_length: int
    eos_token_ids: frozenset[int]

    @property
    def tokenizer(self) -> Tokenizer: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncGenerator[list[int], None]:
        """Yields the newly generated token ids of each engine step until the request ends.

        Closing the iterator early aborts the request inside the engine and frees its slot.
        Raises EngineError(429) at once when the waiting queue is full.
        """
        ...

    def stats(self) -> EngineStats: ...
