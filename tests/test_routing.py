from __future__ import annotations

import random
from collections import Counter
from typing import Any

from gateway.core.metrics import GatewayMetrics
from gateway.core.request import CHAT, COMPLETIONS, ApiRequest, parse_request
from gateway.dispatch.routing import Router
from gateway.engines.pool import Pool, parse_load
from gateway.settings import RouteSettings, parse_settings


def router(seed: int = 1, **routing: Any) -> tuple[Router, Pool]:
    s = parse_settings(
        {
            "engines": [
                {"name": n, "kind": "openai", "url": f"http://127.0.0.1:{p}"} for n, p in (("a", 1), ("b", 2), ("c", 3))
            ],
            "models": [
                {"name": "pool", "routes": [{"engines": ["a", "b"]}]},
                {
                    "name": "split",
                    "routes": [{"engine": "a", "weight": 9}, {"engine": "c", "weight": 1, "name": "canary"}],
                },
            ],
            "routing": routing,
            "auth": {"enabled": False},
        },
        env={},
    )
    pool = Pool(s.engines, s.health, GatewayMetrics())
    for e in pool.engines.values():
        e.healthy = True
    return Router(pool, s.models, s.routing, random.Random(seed)), pool


def req(model: str, **body: Any) -> ApiRequest:
    return ApiRequest(COMPLETIONS, model, {"model": model, "prompt": "x", **body})


def chat(model: str, system: str) -> ApiRequest:
    raw = b'{"model": "%s", "messages": [{"role": "system", "content": "%s"}]}' % (model.encode(), system.encode())
    return parse_request(raw, CHAT)


def test_least_loaded_within_a_route() -> None:
    r, pool = router()
    pool.engines["a"].outstanding = 3
    assert {r.pick(req("pool")).engine.name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    pool.engines["b"].waiting = 5  # the engine's own queue counts too
    assert r.pick(req("pool")).engine.name == "a"  # type: ignore[union-attr]
    pool.engines["a"].outstanding = pool.engines["b"].waiting = 0
    assert {r.pick(req("pool")).engine.name for _ in range(50)} == {"a", "b"}  # ties shared at random


def test_weights_and_health_and_exclusion() -> None:
    r, pool = router()
    picks = [r.pick(req("split")) for _ in range(5000)]
    counts = Counter(p.engine.name for p in picks if p)
    assert 0.87 < counts["a"] / 5000 < 0.93
    assert {p.route.name for p in picks if p and p.engine.name == "c"} == {"canary"}
    pool.engines["a"].healthy = False
    assert {r.pick(req("split")).engine.name for _ in range(50)} == {"c"}  # type: ignore[union-attr]
    assert r.pick(req("split"), frozenset({"c"})) is None


def test_overrides_replace_and_roll_back() -> None:
    r, _ = router()
    r.apply_overrides({"split": (RouteSettings(("b",), "v2", 1.0),), "unknown": ()})
    assert r.pick(req("split")).route.model == "v2" and not r.knows("unknown")  # type: ignore[union-attr]
    r.apply_overrides({})
    assert r.routes["split"] == r.configured("split")


def test_parse_load_reads_ours_and_vllms() -> None:
    text = (
        b"# HELP x\nengine_num_requests_waiting 2.0\nengine_num_requests_running 3.0\n"
        b'vllm:num_requests_waiting{model_name="m",engine="0"} 4.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
    )
    assert parse_load(text) == (6.0, 3.0, 0.5)


def test_prefix_affinity_sticks_until_imbalanced() -> None:
    r, pool = router(strategy="prefix_affinity", prefix_chars=64, max_imbalance=2)
    requests = [chat("pool", f"You are bot {i}.") for i in range(40)]
    owners = [r.pick(q).engine.name for q in requests]  # type: ignore[union-attr]
    assert set(owners) == {"a", "b"}  # spread over the engines
    assert owners == [r.pick(q).engine.name for q in requests]  # type: ignore[union-attr]  # and sticky
    first = requests[owners.index("a")]
    pool.engines["a"].outstanding = 3  # busier than b by more than max_imbalance: load wins
    assert r.pick(first).engine.name == "b"  # type: ignore[union-attr]
    assert req("pool", prompt="x" * 100).prefix(10) == b"x" * 10 and req("pool", prompt=[1, 2]).prefix(10) is None


def test_kv_cache_scorer_adds_to_least_loaded() -> None:
    r, pool = router(plugins=["least_loaded", "kv_cache"])
    pool.engines["a"].kv_usage = 0.9
    assert {r.pick(req("pool")).engine.name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    pool.engines["b"].outstanding = 2  # load outweighs the cache: 0 + 0.1 vs 1 + 1.0
    assert r.pick(req("pool")).engine.name == "a"  # type: ignore[union-attr]
