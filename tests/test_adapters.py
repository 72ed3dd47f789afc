"""LoRA adapters as models, against real processes: two fake engines speaking vLLM's adapter API
(testkit/fake_upstream.py --enable-lora, max_loras 1, slow loads), two gateway replicas sharing one
Redis, three adapters. Every answer must come from the adapter named (the fake tags its answers),
nothing may be unloaded while one of its requests runs, and the two replicas must never load the
same adapter on the same engine twice (the fake counts loads, refusals and duplicates)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import admin, start_gateway
from testkit.metrics import scrape
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer

ADAPTERS = ("a1", "a2", "a3")


@pytest.fixture
def engines(logs_dir: Path) -> Iterator[list[Proc]]:
    args = (
        "--model",
        "base",
        "--enable-lora",
        "--max-loras",
        "1",
        "--load-ms",
        "150",
        "--delay-ms",
        "40",
        "--chunks",
        "4",
    )
    procs = [fake_upstream(logs_dir, *args, name=f"lora-{i}").start() for i in range(2)]
    try:
        yield [p.wait_healthy() for p in procs]
    finally:
        for p in procs:
            p.stop()


def config(redis: RedisServer, engines: list[Proc], root: Path) -> dict[str, Any]:
    for name in ADAPTERS:
        (root / name).mkdir(parents=True, exist_ok=True)
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "timeout": 1.0},
        "auth": {"enabled": False},
        "engines": [{"name": f"e{i}", "kind": "openai", "url": p.url, "max_loras": 1} for i, p in enumerate(engines)],
        "models": [{"name": "base", "routes": [{"engines": ["e0", "e1"], "model": "base"}]}],
        "adapters": {
            "directories": [str(root)],
            "uris": ["s3://adapters/"],
            "load_timeout": 60,
            "models": [{"name": n, "base": "base", "path": str(root / n)} for n in ADAPTERS],
        },
    }


@pytest.fixture
def replicas(logs_dir: Path, redis_server: RedisServer, engines: list[Proc], tmp_path: Path) -> Iterator[list[Proc]]:
    cfg = config(redis_server, engines, tmp_path / "adapters")
    procs = [start_gateway(logs_dir, cfg, f"gw-lora-{i}") for i in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def ask(gw: Proc, model: str, stream: bool = False) -> tuple[str, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=90)
    assert r.status_code == 200, r.text
    if stream:
        import json

        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in r.text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
    else:
        text = r.json()["choices"][0]["message"]["content"]
    return model, text


def stats(engines: list[Proc]) -> list[dict[str, Any]]:
    return [httpx.get(p.url + "/lora_stats").json() for p in engines]


def test_every_request_is_answered_by_its_adapter_and_loads_are_single_flight(
    replicas: list[Proc], engines: list[Proc]
) -> None:
    listed = httpx.get(replicas[0].url + "/v1/models").json()["data"]
    assert {m["id"]: m.get("parent") for m in listed} == {"base": None, "a1": "base", "a2": "base", "a3": "base"}
    rounds = ["a1", "a2", "a3", "a1", "a3", "a2"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for r, adapter in enumerate(rounds):
            # both replicas at once, on the same adapter: each engine may load it once at most
            jobs = [pool.submit(ask, replicas[i % 2], adapter, i % 3 == 0) for i in range(8)]
            jobs += [pool.submit(ask, replicas[i % 2], "base") for i in range(2)]
            for job in jobs:
                model, text = job.result()
                if model == "base":
                    assert not text.startswith("["), text
                else:
                    assert text.startswith(f"[{model}] "), (r, model, text)
    seen = stats(engines)
    for s in seen:
        assert s["unloaded_in_use"] == 0, seen
        assert s["refused"] == 0 and s["duplicates"] == 0, seen
        assert s["most_loaded"] <= 1, seen
    loads = sum(sum(s["loads"].values()) for s in seen)
    # one load per engine per round at most (two replicas, eight requests each round)
    assert len(rounds) <= loads <= 2 * len(rounds), seen
    view = admin(replicas[1], "GET", "/admin/engines").json()["data"]
    assert all(e["max_loras"] == 1 and len(e["adapters"]) <= 1 for e in view)
    assert {a["name"] for e in view for a in e["adapters"]} <= set(ADAPTERS)
    # the loads happen on whichever replica got there first; the requests on both
    assert sum(scrape(r.url, "gateway_adapter_loads_total", adapter="a1") for r in replicas) >= 1
    assert sum(scrape(r.url, "gateway_adapter_requests_total", adapter="a2") for r in replicas) >= 1


def test_admin_adapters_and_hostile_names_and_paths(replicas: list[Proc], engines: list[Proc], tmp_path: Path) -> None:
    a, b = replicas
    root = tmp_path / "adapters"
    made = admin(a, "POST", "/admin/adapters", {"name": "extra", "base": "base", "path": str(root / "a1")})
    assert made.status_code == 201, made.text
    # the other replica sees it within a sweep, and serves it
    import time

    deadline = time.monotonic() + 5
    while "extra" not in {m["id"] for m in httpx.get(b.url + "/v1/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ask(b, "extra")[1].startswith("[extra] ")
    assert admin(b, "GET", "/admin/adapters/extra").json()["source"] == "admin"
    hostile: list[Any] = [
        {"name": "../etc", "base": "base", "path": str(root / "x")},
        {"name": "x" * 200, "base": "base", "path": str(root / "x")},
        {"name": "ok1", "base": "base", "path": "/etc/passwd"},
        {"name": "ok2", "base": "base", "path": str(root / ".." / ".." / "etc")},
        {"name": "ok3", "base": "base", "path": "relative/path"},
        {"name": "ok4", "base": "base", "path": "http://127.0.0.1:6379/"},
        {"name": "ok5", "base": "base", "path": "s3://adapters/../secrets"},
        {"name": "ok6", "base": "base", "path": "s3://user:pw@adapters/x"},
        {"name": "ok7", "base": "nope", "path": str(root / "x")},
        {"name": "base", "base": "base", "path": str(root / "x")},
        {"name": "a1", "base": "base", "path": str(root / "x")},
        {"name": "ok8", "base": "base", "path": str(root / "x") + "\x00"},
        {"name": 7, "base": "base", "path": 7},
        {"name": "ok9", "base": "base", "path": str(root), "extra": 1},
        [],
        "x",
    ]
    for payload in hostile:
        r = admin(a, "POST", "/admin/adapters", payload)
        assert 400 <= r.status_code < 500, (payload, r.status_code, r.text)
        assert "error" in r.json()
    symlink = root / "escape"
    symlink.symlink_to("/etc")
    assert (
        admin(a, "POST", "/admin/adapters", {"name": "ok10", "base": "base", "path": str(symlink)}).status_code == 400
    )
    assert (
        admin(a, "POST", "/admin/adapters", {"name": "s3ok", "base": "base", "path": "s3://adapters/x"}).status_code
        == 201
    )
    assert admin(a, "DELETE", "/admin/adapters/a1").status_code == 409  # declared in the config
    assert admin(a, "DELETE", "/admin/adapters/extra").status_code == 200
    assert admin(a, "DELETE", "/admin/adapters/extra").status_code == 404
    assert admin(a, "GET", "/admin/adapters/..%2f..").status_code == 404
