"""LoRA adapters through the gateway on real CPU engine workers: two engines holding one adapter
each at most (`max_loras: 1`), two gateway replicas sharing one Redis, three adapters made at test
time from the bundled one (its LoRA B weights scaled by 1, -1 and 2: three real adapters whose
greedy answers differ from each other's and from the base model's).

What each adapter answers is first asked of an engine directly (loaded, asked, unloaded); then,
through the gateway, every answer must be its adapter's. The engines' own logs say the rest: no
adapter was unloaded while a request of it ran, none was evicted by the engine (the gateway
unloads first), and every load the gateways sent was a real one (a second load of an adapter an
engine already holds is refused by the engine and would be counted by the gateway only)."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.ci import require
from testkit.keyed import admin, start_gateway
from testkit.lora import scaled_adapter
from testkit.metrics import scrape
from testkit.procs import TINY_MODEL, Proc, worker
from testkit.redis_server import RedisServer

SCALES = {"a1": 1.0, "a2": -1.0, "a3": 2.0}
BASE = "tiny"
PROMPT = "The license"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(importlib.util.find_spec("peft") is not None, "peft is not installed (the engine extra has it)")
    root = tmp_path_factory.mktemp("cpu-adapters")
    for name, scale in SCALES.items():
        scaled_adapter(root / name, scale)
    return root


@pytest.fixture(scope="module")
def engines(logs_dir: Path, adapter_root: Path) -> Iterator[list[Proc]]:
    args = ("--model", str(TINY_MODEL), "--served-model-name", BASE, "--num-blocks", "32")
    lora = ("--enable-lora", "--max-loras", "1", "--lora-dir", str(adapter_root))
    procs = [worker(logs_dir, *args, *lora, name=f"cpu-lora-{i}").start() for i in range(2)]
    try:
        yield [p.wait_healthy() for p in procs]
    finally:
        for p in procs:
            p.stop()


def complete(url: str, model: str, stream: bool = False) -> str:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, (model, r.status_code, r.text)
    if not stream:
        return str(r.json()["choices"][0]["text"])
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def references(engine: Proc, root: Path) -> dict[str, str]:
    """What the base model and each adapter answer, asked of the engine itself."""
    seen = {BASE: complete(engine.url, BASE)}
    for name in SCALES:
        r = httpx.post(
            engine.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)}, timeout=180
        )
        assert r.status_code == 200, r.text
        seen[name] = complete(engine.url, name)
        r = httpx.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        assert r.status_code == 200, r.text
    return seen


def config(redis: RedisServer, engines: list[Proc], root: Path) -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "timeout": 1.0},
        "auth": {"enabled": False},
        "engines": [{"name": f"e{i}", "kind": "openai", "url": p.url, "max_loras": 1} for i, p in enumerate(engines)],
        "models": [{"name": BASE, "routes": [{"engines": ["e0", "e1"], "model": BASE}]}],
        "adapters": {
            "directories": [str(root)],
            "load_timeout": 120,
            "models": [{"name": n, "base": BASE, "path": str(root / n)} for n in SCALES],
        },
    }


def log_since(engine: Proc, offset: int) -> str:
    return engine.log_path.read_bytes()[offset:].decode(errors="replace")


def test_each_adapter_answers_its_requests_on_real_engines(
    logs_dir: Path, redis_server: RedisServer, engines: list[Proc], adapter_root: Path
) -> None:
    expected = references(engines[0], adapter_root)
    assert len(set(expected.values())) == len(expected), expected  # four different answers
    offsets = [p.log_path.stat().st_size for p in engines]
    cfg = config(redis_server, engines, adapter_root)
    replicas = [start_gateway(logs_dir, cfg, f"gw-cpu-lora-{i}") for i in range(2)]
    try:
        listed = httpx.get(replicas[0].url + "/v1/models").json()["data"]
        assert {m["id"]: m.get("parent") for m in listed} == {BASE: None, "a1": BASE, "a2": BASE, "a3": BASE}
        # One adapter a round, asked on both replicas at once (both may want to load it), the base
        # beside it; then all three at once: one waits for a slot (two engines, one adapter each).
        rounds = [["a1"] * 4, ["a2"] * 4, ["a3"] * 4, ["a1"] * 4, ["a1", "a2", "a3", "a2"]]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for r, names in enumerate(rounds):
                asked = [*names, BASE]
                jobs = [pool.submit(complete, replicas[i % 2].url, name, i % 2 == 1) for i, name in enumerate(asked)]
                for name, job in zip(asked, jobs, strict=True):
                    assert job.result() == expected[name], (r, name)
        view = admin(replicas[1], "GET", "/admin/engines").json()["data"]
        assert all(e["max_loras"] == 1 and len(e["adapters"]) <= 1 for e in view), view
        for i, engine in enumerate(engines):
            log = log_since(engine, offsets[i])
            assert "evicted LoRA adapter" not in log  # the gateway made room itself
            in_use = [int(n) for n in re.findall(r"unloaded LoRA adapter \S+ \((\d+) requests in flight\)", log)]
            assert in_use and not any(in_use), in_use  # unloads happened, never of an adapter in use
            loads = len(re.findall(r"loaded LoRA adapter \S+ from", log))
            sent = sum(scrape(g.url, "gateway_adapter_loads_total", engine=f"e{i}", outcome="loaded") for g in replicas)
            assert loads == sent, (i, loads, sent)  # no load was a second one of an adapter held there
    finally:
        for g in replicas:
            g.stop()
