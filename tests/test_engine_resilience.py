"""The CPU engine stays responsive: after mass client aborts, and while a huge prompt is in work.

Real engine processes with the tiny model, driven over HTTP by httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.metrics import metric
from testkit.procs import TINY_MODEL, Proc, worker

MODEL = "tiny-llama"
STREAMS = 64


@pytest.fixture(scope="module")
def small_cache_worker(logs_dir: Path) -> Iterator[Proc]:
    # A KV cache of 32 blocks x 64 tokens holds 2,048 tokens: 64 long streams outgrow it within
    # seconds, so the engine must offload requests (the state in which mass aborts wedged it).
    proc = worker(logs_dir, "--model", str(TINY_MODEL), "--num-blocks", "32", name="smallcache").start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


async def _stream_until(client: httpx.AsyncClient, url: str, index: int, abort_after: float) -> int:
    """Opens a long stream and walks away from it after `abort_after` seconds; returns the chunks seen."""
    body = {"model": MODEL, "prompt": f"Story {index}: once", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    chunks = 0

    async def read() -> None:
        nonlocal chunks
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1

    with contextlib.suppress(TimeoutError):  # the client leaves: the connection closes mid-stream
        await asyncio.wait_for(read(), abort_after)
    return chunks


async def _mass_abort(url: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    moments = [rng.uniform(0.3, 8.0) for _ in range(STREAMS)]
    limits = httpx.Limits(max_connections=STREAMS + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:
        return await asyncio.gather(*(_stream_until(client, url, i, m) for i, m in enumerate(moments)))


def test_engine_answers_at_once_after_mass_aborts(small_cache_worker: Proc) -> None:
    url = small_cache_worker.url
    chunks = asyncio.run(_mass_abort(url, seed=20))
    assert sum(chunks) > STREAMS, "the streams never got going"
    offloaded_or_full = metric(httpx.get(url + "/metrics").text, "engine_kv_blocks_total")
    assert offloaded_or_full == 32
    # Every stream is gone: the engine must serve a new request at once.
    started = time.monotonic()
    r = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0},
        timeout=30.0,
    )
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    print(f"first answer after {STREAMS} aborted streams: {took:.3f}s")
    assert took < 5.0, f"the engine took {took:.1f}s to answer after the aborts"
    text = httpx.get(url + "/metrics").text
    assert metric(text, "engine_num_requests_running") == 0
    assert metric(text, "engine_num_requests_waiting") == 0
    assert httpx.get(url + "/health").status_code == 200


def _words(size: int) -> str:
    rng = random.Random(25)
    vocab = ["the", "engine", "answers", "health", "while", "a", "prompt", "of", "many", "words", "waits", "here"]
    out: list[str] = []
    total = 0
    while total < size:
        word = rng.choice(vocab)
        out.append(word)
        total += len(word) + 1
    return " ".join(out)


def test_health_answers_while_a_huge_prompt_is_tokenized(small_cache_worker: Proc) -> None:
    url = small_cache_worker.url
    prompt = _words(3_800_000)  # under the worker's 4 MiB body limit; seconds of tokenizing
    outcome: dict[str, object] = {}

    async def run() -> list[float]:
        # The first huge prompt also starts the tokenizer's child process: seconds on a busy machine.
        async with httpx.AsyncClient(timeout=300.0) as client:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}

            async def big() -> None:
                started = time.monotonic()
                r = await client.post(url + "/v1/completions", json=body)
                outcome["status"], outcome["body"] = r.status_code, r.json()
                outcome["took"] = time.monotonic() - started

            task = asyncio.create_task(big())
            times: list[float] = []
            while not task.done():
                started = time.monotonic()
                h = await client.get(url + "/health", timeout=5.0)
                times.append(time.monotonic() - started)
                assert h.status_code == 200, h.text
                await asyncio.sleep(0.05)
            await task
            return times

    times = asyncio.run(run())
    # Far longer than the model's context: a clean 400 after the tokenizer has been through it all.
    assert outcome["status"] == 400, outcome
    assert outcome["body"]["error"]["code"] == "context_length_exceeded"  # type: ignore[index]
    print(f"huge prompt answered in {outcome['took']:.2f}s; {len(times)} health checks, slowest {max(times):.3f}s")
    assert len(times) >= 3, "the huge prompt was answered too fast to watch /health meanwhile"
    # The worker still parses the 3.8 MB JSON body on its event loop (~50 ms of CPU): on a machine
    # loaded far past its cores one check may wait for that. Tokenizing on the loop blocked every
    # check for the whole tokenization (seconds), which both bounds catch.
    times.sort()
    assert times[int(len(times) * 0.95)] < 0.5, f"/health p95 {times[int(len(times) * 0.95)]:.2f}s meanwhile"
    assert times[-1] < 2.0, f"/health took {times[-1]:.2f}s while the prompt was tokenized"


@pytest.mark.parametrize("size", [10, 300_000])
def test_a_lone_surrogate_is_a_400(small_cache_worker: Proc, size: int) -> None:
    text = "a" * size
    # json.dumps writes the lone surrogate as its escape, "\\ud800": valid JSON, no valid text.
    raw = json.dumps({"model": MODEL, "prompt": text + "\ud800", "max_tokens": 2}).encode()
    r = httpx.post(
        small_cache_worker.url + "/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=300,
    )
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["error"]["message"]


def test_health_turns_red_while_the_generation_loop_is_stuck() -> None:
    """The real engine in this process, its loop held still: /health's verdict says so."""
    from engines.cpu import CpuEngine, CpuEngineConfig
    from engines.protocol import SamplingParams

    engine = CpuEngine(CpuEngineConfig(TINY_MODEL, num_blocks=16, threads=1, stall_seconds=1.0))
    engine.start()
    params = SamplingParams(8, 0.0, 1.0, None, (), 1, True, 0)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine.paused():
            held.set()
            release.wait(60)

    async def run() -> tuple[str | None, float]:
        assert engine.health() is None
        holder = threading.Thread(target=hold)
        holder.start()
        assert await asyncio.to_thread(held.wait, 30)
        generated = engine.generate("stuck-1", engine.text_prompt("Hello"), params, 8, engine.reserve(1))
        first = asyncio.ensure_future(anext(generated))
        started = time.monotonic()
        while engine.health() is None:
            assert time.monotonic() - started < 10, "a stuck loop still looks healthy"
            await asyncio.sleep(0.1)
        verdict, noticed = engine.health(), time.monotonic() - started
        assert not first.done()
        release.set()
        assert await asyncio.wait_for(first, 30), "the loop did not resume"
        await generated.aclose()
        await asyncio.to_thread(holder.join, 10)
        return verdict, noticed

    try:
        verdict, noticed = asyncio.run(run())
    finally:
        release.set()
        engine.stop()
    assert verdict is not None and "no progress" in verdict
    assert noticed >= 0.9  # not before the stall threshold
    assert engine.health() is not None  # stopped: not alive


def test_large_prompts_tokenize_in_a_child_process_exactly_as_here() -> None:
    from transformers import AutoTokenizer

    from engines.tokenizing import LARGE_PROMPT_CHARS, PromptTokenizer, chat_ids, text_ids

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    text = _words(LARGE_PROMPT_CHARS + 1000)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]

    async def run() -> tuple[object, object]:
        prompts = PromptTokenizer(tokenizer, TINY_MODEL, limit=10**7)
        try:
            return await prompts.text(text), await prompts.chat(messages)
        finally:
            await prompts.aclose()

    as_text, as_chat = asyncio.run(run())
    assert as_text == text_ids(tokenizer, text)
    assert as_chat == chat_ids(tokenizer, messages)
