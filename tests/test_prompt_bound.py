"""A model's `max_prompt_tokens`: a prompt over it never reaches an engine.

A real gateway in front of a fake engine that counts what it is sent (`--count`, per `user`), and
the model's tokenizer (the bundled tiny model's) for exact counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.ci import require
from testkit.procs import TINY_MODEL, Proc, all_healthy, fake_upstream, gateway

LIMIT = 1000


@pytest.fixture(scope="module")
def bounded(logs_dir: Path) -> Iterator[tuple[Proc, Proc]]:
    require((TINY_MODEL / "tokenizer.json").exists(), "tiny model missing")
    engine = fake_upstream(logs_dir, "--count", name="counting")
    with all_healthy({"engine": engine}):
        config = {
            "auth": {"enabled": False},
            "engines": [{"name": "e", "kind": "openai", "url": engine.url}],
            "models": [
                {
                    "name": "fake",
                    "tokenizer": str(TINY_MODEL),
                    "max_prompt_tokens": LIMIT,
                    "routes": [{"engine": "e"}],
                },
                {"name": "free", "routes": [{"engine": "e"}]},
            ],
        }
        gw = gateway(logs_dir, config, name="bounded").start()
        try:
            yield gw.wait_healthy("/ready"), engine
        finally:
            gw.stop()


def _post(gw: Proc, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=60)


def test_big_prompts_are_refused_before_any_engine_sees_them(bounded: tuple[Proc, Proc]) -> None:
    gw, engine = bounded
    huge = "lorem ipsum dolor " * 210_000  # 3.8 MB
    began = time.monotonic()
    r = _post(
        gw, "/v1/chat/completions", {"model": "fake", "user": "huge", "messages": [{"role": "user", "content": huge}]}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert f"over {LIMIT} tokens" in error["message"]
    assert time.monotonic() - began < 5  # refused on its size: never counted, never sent

    # Under the byte ceiling but over the bound: counted with the model's tokenizer, then refused.
    long = "word " * 3000
    r = _post(gw, "/v1/completions", {"model": "fake", "user": "long", "prompt": long, "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt", error
    assert f"limit is {LIMIT} tokens, but the prompt has" in error["message"]

    short = {"model": "fake", "user": "short", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert _post(gw, "/v1/chat/completions", short).status_code == 200
    # A model without the bound passes a long prompt on.
    assert _post(gw, "/v1/completions", {"model": "free", "user": "free", "prompt": long}).status_code == 200
    counts = httpx.get(engine.url + "/counts").json()
    assert counts == {"short": 1, "free": 1}, counts
