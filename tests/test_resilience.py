"""Nothing a client sees breaks: streams that survive their engine, and fallback models.

Real processes throughout: two CPU engine workers with the tiny model behind one route (one of them
SIGKILLed while 20 long streams run), fake engines for the fallbacks, a private Redis for keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.proxy.resume import SoFar, Splice, Transcript, continuation, read_transcript
from testkit.ci import require
from testkit.keyed import ADMIN_KEY, admin, create_key
from testkit.procs import TINY_MODEL, Proc, all_healthy, fake_upstream, gateway, worker
from testkit.redis_server import RedisServer

STREAMS = 20
MAX_TOKENS = 160


# -- the pure parts --------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(text: str, finish: str | None = None, id_: str = "chatcmpl-a") -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def test_a_transcript_reads_back_what_was_sent() -> None:
    kept = Transcript()
    kept.keep(_event({"id": "chatcmpl-a", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    kept.keep(_event(_chunk("The")) + _event(_chunk(" license")))
    so_far = read_transcript(kept.blocks, chat=True)
    assert (so_far.id, so_far.text, so_far.tokens, so_far.finish_reason) == ("chatcmpl-a", "The license", 2, None)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    follow = continuation(body, True, so_far, 10)
    assert follow is not None
    assert follow["messages"][-1] == {"role": "assistant", "content": "The license"}
    assert follow["continue_final_message"] is True and follow["add_generation_prompt"] is False
    assert follow["max_tokens"] == 8 and body["max_tokens"] == 10 and len(body["messages"]) == 1


def test_what_cannot_be_continued_as_text_is_not() -> None:
    tool = _event({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    assert not read_transcript([tool], chat=True).resumable
    two = _event({"id": "x", "choices": [{"index": 1, "delta": {"content": "a"}}]})
    assert not read_transcript([two], chat=True).resumable
    so_far = SoFar(id="x", text="ab", tokens=2)
    assert continuation({"prompt": [1, 2, 3]}, False, so_far, 10) is None  # token ids
    assert continuation({"prompt": "p", "n": 2}, False, so_far, 10) is None
    assert continuation({"prompt": "p"}, False, so_far, 2) is None  # nothing left to write
    follow = continuation({"prompt": ["p"], "echo": True, "max_tokens": 5}, False, so_far, 5)
    assert follow == {"prompt": "pab", "echo": False, "max_tokens": 3}
    kept = Transcript(limit=10)
    kept.keep(b"x" * 11)
    assert kept.overflow and kept.blocks == []


def test_a_splice_keeps_the_stream_id_and_counts_the_prompt_once() -> None:
    so_far = SoFar(id="chatcmpl-a", text="The license", tokens=2)
    splice = Splice(so_far, prompt_tokens=None)
    assert splice(_event(_chunk(" is", id_="chatcmpl-b"))) == _event(_chunk(" is", id_="chatcmpl-a"))
    usage = _event(
        {"id": "chatcmpl-b", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
    )
    fixed = json.loads(splice(usage)[len(b"data: ") :])
    assert fixed["id"] == "chatcmpl-a"
    assert fixed["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    counted = Splice(so_far, prompt_tokens=9)
    assert json.loads(counted(usage)[len(b"data: ") :])["usage"]["prompt_tokens"] == 9


# -- a stream whose engine is killed ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    require((TINY_MODEL / "config.json").exists(), "tiny model missing")
    args = ("--model", str(TINY_MODEL), "--served-model-name", "tiny", "--max-waiting", "64")
    procs = {name: worker(logs_dir, *args, name=name) for name in ("a", "b")}
    with all_healthy(procs) as running:
        yield running


@pytest.fixture(scope="module")
def resilient(logs_dir: Path, engines: dict[str, Proc], redis_session: RedisServer) -> Iterator[Proc]:
    redis_session.fresh()
    config = {
        "server": {"workers": 1},
        "health": {"interval": 0.5},
        "redis": {"url": redis_session.url},
        "auth": {"enabled": True},
        "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in engines.items()],
        "models": [{"name": "tiny", "tokenizer": str(TINY_MODEL), "routes": [{"engines": ["a", "b"]}]}],
    }
    gw = gateway(logs_dir, config, name="resilient", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        yield gw.wait_healthy("/ready")
    finally:
        gw.stop()


async def _stream(client: httpx.AsyncClient, secret: str, i: int, started: asyncio.Event) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Tell me about licenses, number {i}."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    ids: set[str] = set()
    text: list[str] = []
    finish, usage, errors, done = None, None, [], False
    headers = {"authorization": f"Bearer {secret}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            ids.add(event["id"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                    if len(text) == 10:
                        started.set()
                finish = choice.get("finish_reason") or finish
    return {"ids": ids, "tokens": len(text), "finish": finish, "usage": usage, "errors": errors, "done": done}


def test_streams_survive_the_death_of_their_engine(resilient: Proc, engines: dict[str, Proc]) -> None:
    key_id, secret = create_key(resilient)

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=resilient.url, timeout=120) as client:
            started = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [asyncio.create_task(_stream(client, secret, i, started[i])) for i in range(STREAMS)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            assert engines["a"].proc is not None
            os.kill(engines["a"].proc.pid, signal.SIGKILL)  # mid-stream for every client
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for r in results:
        assert r["errors"] == [] and r["done"], r
        assert r["finish"] == "length", r
        assert len(r["ids"]) == 1, r  # one stream, one id
        usage = r["usage"]
        # The completion as sent: at least the events that carried text (a token may carry none
        # while the detokenizer waits for the rest of a character), at most what was asked.
        assert usage is not None and r["tokens"] <= usage["completion_tokens"] <= MAX_TOKENS, r
    metrics = httpx.get(resilient.url + "/metrics").text
    assert 'gateway_stream_resumes_total{model="tiny",outcome="resumed"}' in metrics
    # Charged once: what the key was charged is what the clients were told they used.
    seen_prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    seen_completion = sum(r["usage"]["completion_tokens"] for r in results)
    deadline = time.monotonic() + 10
    while True:
        day = admin(resilient, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
        if day["requests"] == STREAMS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (STREAMS, seen_prompt, seen_completion)


# -- fallbacks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fallback_gw(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[Proc, Proc, Proc]]:
    primary = fake_upstream(logs_dir, "--capacity", "1", "--service-ms", "3000", name="primary")
    backup = fake_upstream(logs_dir, "--model", "small-v1", name="backup")
    with all_healthy({"primary": primary, "backup": backup}):
        redis_session.fresh()
        config = {
            "health": {"interval": 0.3},
            "redis": {"url": redis_session.url},
            "auth": {"enabled": True},
            "scheduler": {"enabled": True},
            "engines": [
                {"name": "primary", "kind": "openai", "url": primary.url, "max_inflight": 1},
                {"name": "backup", "kind": "openai", "url": backup.url},
            ],
            "models": [
                {"name": "big", "routes": [{"engine": "primary"}], "fallbacks": ["small"], "fallback_after": 0.3},
                {"name": "small", "routes": [{"engine": "backup", "model": "small-v1"}]},
                {"name": "lonely", "routes": [{"engine": "primary"}], "fallbacks": ["small"]},
            ],
        }
        gw = gateway(logs_dir, config, name="fallbacks", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
        try:
            yield gw.wait_healthy("/ready"), primary, backup
        finally:
            gw.stop()


def _ask(gw: Proc, secret: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(
        gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=30
    )


def test_a_saturated_model_hands_over_to_its_fallback(fallback_gw: tuple[Proc, Proc, Proc]) -> None:
    gw, _, _ = fallback_gw
    _, secret = create_key(gw, models=["big", "small"])

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            headers = {"authorization": f"Bearer {secret}"}
            first = asyncio.create_task(client.post(gw.url + "/v1/chat/completions", json=body, headers=headers))
            await asyncio.sleep(0.5)  # the primary's only slot is taken
            second = await client.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
            return [await first, second]

    first, second = asyncio.run(run())
    assert first.status_code == 200 and "x-gateway-model" not in first.headers
    assert second.status_code == 200, second.text
    assert second.headers["x-gateway-model"] == "small" and second.json()["model"] == "small-v1"


def test_a_key_must_be_allowed_the_fallback(fallback_gw: tuple[Proc, Proc, Proc]) -> None:
    gw, primary, _ = fallback_gw
    _, only_big = create_key(gw, models=["lonely"])
    _, both = create_key(gw, models=["lonely", "small"])
    primary.stop()  # no healthy engine for `lonely`
    try:
        deadline = time.monotonic() + 20
        while (r := _ask(gw, both, "lonely")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200 and r.headers["x-gateway-model"] == "small", r.text
        refused = _ask(gw, only_big, "lonely")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_healthy_engine"
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_fallbacks_total{model="lonely",served="small"}' in metrics
    finally:
        primary.start().wait_healthy()
