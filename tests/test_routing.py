from __future__ import annotations

import random
from collections import Counter

from gateway.metrics import GatewayMetrics
from gateway.pool import Pool, parse_load
from gateway.routing import Router
from gateway.settings import parse_settings


def router(seed: int = 1) -> tuple[Router, Pool]:
    s = parse_settings(
        {
            "engines": [
                {"name": n, "kind": "openai", "url": f"http://127.0.0.1:{p}"} for n, p in (("a", 1), ("b", 2), ("c", 3))
            ],
            "models": [
                {"name": "pool", "routes": [{"engines": ["a", "b"]}]},
                {"name": "split", "routes": [{"engine": "a", "weight": 9}, {"engine": "c", "weight": 1}]},
            ],
            "auth": {"enabled": False},
        },
        env={},
    )
    pool = Pool(s.engines, s.health, GatewayMetrics())
    for e in pool.engines.values():
        e.healthy = True
    return Router(pool, s.models, random.Random(seed)), pool


def test_least_loaded_within_a_route() -> None:
    r, pool = router()
    pool.engines["a"].outstanding = 3
    assert {r.pick("pool").engine.name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    pool.engines["b"].waiting = 5  # the engine's own queue counts too
    assert r.pick("pool").engine.name == "a"  # type: ignore[union-attr]


def test_weights_and_health_and_exclusion() -> None:
    r, pool = router()
    counts = Counter(r.pick("split").engine.name for _ in range(5000))  # type: ignore[union-attr]
    assert 0.87 < counts["a"] / 5000 < 0.93
    pool.engines["a"].healthy = False
    assert {r.pick("split").engine.name for _ in range(50)} == {"c"}  # type: ignore[union-attr]
    assert r.pick("split", frozenset({"c"})) is None


def test_overrides_replace_and_roll_back() -> None:
    r, _ = router()
    from gateway.settings import RouteSettings

    r.apply_overrides({"split": (RouteSettings(("b",), "v2", 1.0),), "unknown": ()})
    assert r.pick("split").upstream_model == "v2" and not r.knows("unknown")  # type: ignore[union-attr]
    r.apply_overrides({})
    assert r.routes["split"] == r.configured("split")


def test_parse_load_reads_ours_and_vllms() -> None:
    text = (
        b"# HELP x\nengine_num_requests_waiting 2.0\nengine_num_requests_running 3.0\n"
        b'vllm:num_requests_waiting{model_name="m",engine="0"} 4.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
    )
    assert parse_load(text) == (6.0, 3.0, 0.5)


def test_prefix_affinity_sticks_until_imbalanced() -> None:
    from gateway.routing import prefix_key
    from gateway.settings import RoutingSettings

    r, pool = router()
    r.routing = RoutingSettings("prefix_affinity", 64, 2)
    keys = [prefix_key({"messages": [{"role": "system", "content": f"You are bot {i}."}]}, 64) for i in range(40)]
    owners = [r.pick("pool", prefix=k).engine.name for k in keys]  # type: ignore[union-attr]
    assert set(owners) == {"a", "b"}  # spread over the engines
    assert owners == [r.pick("pool", prefix=k).engine.name for k in keys]  # type: ignore[union-attr]  # and sticky
    first = keys[owners.index("a")]
    pool.engines["a"].outstanding = 3  # busier than b by more than max_imbalance: load wins
    assert r.pick("pool", prefix=first).engine.name == "b"  # type: ignore[union-attr]
    assert prefix_key({"prompt": "x" * 100}, 10) == b"x" * 10 and prefix_key({"prompt": [1, 2]}, 10) is None
