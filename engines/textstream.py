"""Token ids in, text deltas out: incremental detokenization with stop-string matching."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Turns generated token ids into text deltas.

    Decoding each new token alone breaks multi-byte characters and word-boundary spaces, so the
    stream re-decodes a short window of recent tokens and emits only what the window adds. Text
    that could be the start of a stop string is held back until it is known not to be one, so a
    stop string never reaches the client, not even in part.
    """

    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already in self._text
        self._text = ""  # all text decoded so far
        self._emitted = 0  # chars of self._text already handed out
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Add new tokens; returns the text that can be sent now (may be empty)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: flush what was held back."""
        if self.stopped:
            return ""
        rest = self._tokenizer.decode(self._ids[self._read_offset :], skip_special_tokens=True)
        if rest and not rest.endswith("\ufffd"):
            self._text += rest
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            # Search only the region that could contain a new match.
            start = max(0, self._emitted - self._holdback)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                delta = self._text[self._emitted : end]
                self._emitted = end
                return delta
        end = len(self._text) if final else max(self._emitted, len(self._text) - self._holdback)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    @property
    def text(self) -> str:
        return self._text[: self._emitted]
