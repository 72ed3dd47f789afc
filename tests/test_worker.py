"""The CPU engine worker as a real process with the tiny model, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from testkit.metrics import metric
from testkit.procs import TINY_MODEL, Proc, running, worker

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def client(tiny_worker: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_worker.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def chat_prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:  # type: ignore[no-untyped-def]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_non_streaming_usage_matches_tokenizer(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a license?"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens == chat_prompt_tokens(tokenizer, messages)
    assert 1 <= r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 20


def test_completion_max_tokens_is_exact_with_ignore_eos(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = "The software is provided"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=33, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 33
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.choices[0].text


def test_greedy_is_deterministic(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Permission is hereby granted", "max_tokens": 16, "temperature": 0}
    a = client.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert a.choices[0].text == b.choices[0].text


def test_chat_streaming_with_usage(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Tell me about the license."}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens == chat_prompt_tokens(tokenizer, messages)
    # The streamed text is the decoding of the generated tokens (up to whitespace at the joins).
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 12


def test_completion_streaming_without_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="Python is", max_tokens=10, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_string_is_honoured(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model=MODEL, prompt="The license", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    full = base.choices[0].text
    # Pick a stop string from the middle of the greedy answer: the same run must stop right before it.
    words = [w for w in full.split() if len(w) >= 3]
    assert words, full
    stop = words[len(words) // 2]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL,
            prompt="The license",
            max_tokens=40,
            temperature=0,
            stop=[stop],
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            pieces = list(r)  # type: ignore[arg-type]
            text = "".join(c.choices[0].text for c in pieces)
            finish = pieces[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason  # type: ignore[union-attr]
        assert finish == "stop"
        assert text == cut
        assert stop not in text


def test_n_choices_and_prompt_arrays(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["A", "The"], n=2, max_tokens=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens == 20
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert c.usage is not None and c.usage.completion_tokens == 12


def test_min_tokens(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, extra_body={"min_tokens": 30})
    assert r.usage is not None and r.usage.completion_tokens == 30


def test_models_health_metrics(tiny_worker: Proc, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(tiny_worker.url + "/health").json() == {"status": "ok"}
    text = httpx.get(tiny_worker.url + "/metrics").text
    for name in (
        "engine_num_requests_running",
        "engine_num_requests_waiting",
        "engine_kv_blocks_used",
        "engine_kv_blocks_total",
        "engine_generation_tokens_total",
        "engine_time_to_first_token_seconds_count",
    ):
        assert name in text, name
    assert metric(text, "engine_kv_blocks_total") > 0


def test_sixteen_concurrent_streams_complete(tiny_worker: Proc) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.completions.create(
            model=MODEL,
            prompt=f"Item {i}:",
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return usage.completion_tokens

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=tiny_worker.url + "/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    assert asyncio.run(main()) == [32] * 16


# ---- bad input ---------------------------------------------------------------------------------

BAD_INPUTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0]",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0]",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        400,
        "stream",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
        400,
        "n",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_INPUTS)
def test_bad_input_gets_openai_error(
    tiny_worker: Proc, path: str, body: object, status: int, param: str | None
) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(tiny_worker.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param


def test_oversize_body_is_413_and_unknown_fields_ignored(tiny_worker: Proc) -> None:
    big = {"model": MODEL, "prompt": "x" * (5 * 1024 * 1024)}
    r = httpx.post(tiny_worker.url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(
        tiny_worker.url + "/v1/completions",
        timeout=30,
        json={"model": MODEL, "prompt": "x", "max_tokens": 2, "future_field": {"x": 1}},
    )
    assert ok.status_code == 200
    # Still serving after all of that.
    assert httpx.get(tiny_worker.url + "/health").status_code == 200


def test_unknown_route_and_method(tiny_worker: Proc) -> None:
    r = httpx.get(tiny_worker.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(tiny_worker.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---- overload and disconnects: a worker of their own with a tiny queue ---------------------------


@pytest.fixture(scope="module")
def small_queue_worker(logs_dir: Path) -> Iterator[Proc]:
    with running(worker(logs_dir, "--model", str(TINY_MODEL), "--max-waiting", "2", name="smallq")) as proc:
        yield proc


def requests_running(proc: Proc) -> float:
    return metric(httpx.get(proc.url + "/metrics").text, "engine_num_requests_running")


def test_streaming_disconnect_aborts_in_engine(small_queue_worker: Proc) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", small_queue_worker.url + "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert requests_running(small_queue_worker) == 1
    gone = time.monotonic()
    while requests_running(small_queue_worker) != 0:
        assert time.monotonic() - gone < 1.0, "the aborted stream still runs in the engine"
        time.sleep(0.02)
    assert metric(httpx.get(small_queue_worker.url + "/metrics").text, "engine_requests_aborted_total") >= 1


def test_non_streaming_disconnect_aborts_in_engine(small_queue_worker: Proc) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_queue_worker.url + "/v1/completions", json=body, timeout=1.0)
    gone = time.monotonic()
    while requests_running(small_queue_worker) != 0:
        assert time.monotonic() - gone < 1.0, "the abandoned request still runs in the engine"
        time.sleep(0.02)


def test_full_queue_answers_429_at_once(small_queue_worker: Proc) -> None:
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 64, "ignore_eos": True}

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(
                *(c.post(small_queue_worker.url + "/v1/completions", json=body) for _ in range(24))
            )
        for r in rs:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_exceeded"
                assert r.headers["retry-after"]
        return [r.status_code for r in rs]

    statuses = asyncio.run(main())
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2


def test_full_queue_refuses_streams_before_the_first_byte(small_queue_worker: Proc) -> None:
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 32, "ignore_eos": True, "stream": True}

    async def one(c: httpx.AsyncClient) -> tuple[int, str]:
        async with c.stream("POST", small_queue_worker.url + "/v1/completions", json=body) as r:
            return r.status_code, (await r.aread()).decode()

    async def main() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c) for _ in range(24)))

    results = asyncio.run(main())
    statuses = [status for status, _ in results]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2
    for status, text in results:
        if status == 200:  # a stream that started finishes: no in-band overload error
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]")
