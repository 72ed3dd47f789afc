from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engines.textstream import TextStream
from testkit.ci import require
from testkit.procs import TINY_MODEL

TEXT = "Permission is hereby granted, free of charge — naïve café ☕ to any person obtaining a copy."


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    require((TINY_MODEL / "tokenizer.json").exists(), "tiny model tokenizer missing")
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def feed(stream: TextStream, ids: list[int]) -> str:
    out = "".join(stream.push([i]) for i in ids)
    return out + stream.finish()


def test_token_by_token_equals_whole_decode(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert feed(TextStream(tok), ids) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_cut_and_never_leaked(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tok, ("free of",))
    pieces = [stream.push([i]) for i in ids]
    assert stream.stopped
    assert "".join(pieces) + stream.finish() == tok.decode(ids).split("free of")[0]
    assert all("free" not in p for p in pieces)


def test_special_tokens_are_not_text(tok) -> None:  # type: ignore[no-untyped-def]
    ids = [*tok.encode("Hello there", add_special_tokens=False), tok.eos_token_id]
    assert feed(TextStream(tok), ids) == "Hello there"
