"""The gateway code the response cache and adapters add to a request, timed in-process (CPU time,
`time.process_time`), so differences of microseconds show above the noise of a loaded machine:

- adapter: the adapter-affinity filter over two engines, then `Placement.ensure` and `done` for an
  adapter already loaded and marked in use (the steady state: no Redis);
- cache miss: `consult` (policy and key), the lookup (none: the digest is unknown), the recording
  of the answer, `finish` and the store against a real local Redis (gathered, one EVALSHA per
  batch, through the request path's client), the answer kept in the process too;
- cache hit: `consult` and the answer from the process's own copy (no Redis), `finish`;
- cache off: the one check the request path makes (`gw.cache is not None`).

    .venv/bin/python bench/cache_adapters_inprocess.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.access.base import Principal  # noqa: E402
from gateway.adapters.placement import Placement  # noqa: E402
from gateway.cache.service import ResponseCache  # noqa: E402
from gateway.cache.store import CacheStore  # noqa: E402
from gateway.core.metrics import GatewayMetrics  # noqa: E402
from gateway.core.request import CHAT, parse_request  # noqa: E402
from gateway.dispatch.routing import Router  # noqa: E402
from gateway.dispatch.routing.plugins import AdapterAffinity  # noqa: E402
from gateway.engines.pool import Pool  # noqa: E402
from gateway.resp.connect import build_clients  # noqa: E402
from gateway.settings import parse_settings  # noqa: E402
from testkit.procs import free_port  # noqa: E402
from testkit.redis_server import RedisServer  # noqa: E402

ANSWER = orjson.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 16}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
    }
)


async def run(n: int, redis_url: str) -> dict[str, float]:
    s = parse_settings(
        {
            "auth": {"enabled": False},
            "engines": [{"name": f"e{i}", "kind": "openai", "url": f"http://127.0.0.1:{9000 + i}"} for i in range(2)],
            "models": [{"name": "m", "routes": [{"engines": ["e0", "e1"]}], "cache": True}],
        }
    )
    metrics = GatewayMetrics()
    pool = Pool(s.engines, s.health, metrics)
    router = Router(pool, s.models, s.routing)
    engines = list(pool.engines.values())
    out: dict[str, float] = {}

    # adapter: the steady state of a loaded adapter
    placement = Placement(None, "gw", pool, None, metrics, 10)  # type: ignore[arg-type]
    engines[0].adapters.add("a1")
    placement._marked.add(("e0", "a1"))
    request = parse_request(orjson.dumps({"model": "a1", "messages": [{"role": "user", "content": "hi"}]}), CHAT)
    affinity = AdapterAffinity()
    start = time.process_time()
    for _ in range(n):
        chosen = affinity.filter(request, engines)
        await placement.ensure(chosen[0], "a1")
        placement.done(chosen[0], "a1")
    out["adapter"] = (time.process_time() - start) / n * 1000
    base = parse_request(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}), CHAT)
    start = time.process_time()
    for _ in range(n):
        affinity.filter(base, engines)
    out["base filter"] = (time.process_time() - start) / n * 1000

    # cache miss: consult, lookup, record, finish + store
    clients = build_clients(redis_url)
    store = CacheStore(clients.lean, "gw", 3600, 1 << 30)
    cache = ResponseCache(s.cache, {m.name: m for m in s.models}, lambda m: router.routes[m], store, metrics)
    scope: dict[str, Any] = {"headers": [(b"host", b"x"), (b"content-type", b"application/json")]}
    principal = Principal("key_1")

    async def sink(message: Any) -> None:
        return None

    await clients.lean.execute("PING")  # connected, as the cache's sync task leaves it in the gateway
    cache._follow(await store.generations())  # as the sync task does: answers kept in the process too

    start = time.process_time()
    for i in range(n):
        raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0})
        req = parse_request(raw, CHAT)
        lookup = cache.consult(scope, req, principal)
        assert lookup is not None
        assert await cache.answer(lookup, req) is None
        send = lookup.record(sink, 1 << 20)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ANSWER})
        cache.finish(lookup, req, 200, True, None)
    await clients.lean.execute("PING")  # the stores sent without waiting are done
    out["cache miss"] = (time.process_time() - start) / n * 1000
    start = time.process_time()
    for i in range(n):
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0})
        parse_request(raw, CHAT)
    out["(body build+parse, subtracted)"] = (time.process_time() - start) / n * 1000
    out["cache miss"] -= out["(body build+parse, subtracted)"]

    # cache hit: consult and the answer kept in the process (no Redis)
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "q0"}], "temperature": 0})
    req = parse_request(raw, CHAT)
    start = time.process_time()
    for _ in range(n):
        lookup = cache.consult(scope, req, principal)
        assert lookup is not None
        assert await cache.answer(lookup, req) is not None
        cache.finish(lookup, req, 200, True, None)
    out["cache hit (in-process part)"] = (time.process_time() - start) / n * 1000
    await cache.stop()  # the last stores sent
    await clients.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH")
    redis = RedisServer(binary, free_port(), Path(tempfile.mkdtemp(prefix="bench-cache-"))).start()
    try:
        out = asyncio.run(run(args.requests, redis.url))
    finally:
        redis.stop()
    print(f"CPU ms per request, in-process, {args.requests} requests:")
    for name, value in out.items():
        print(f"  {name:32s} {value:.4f}")
    print(f"adapter-routed request adds        {out['adapter'] - out['base filter']:+.4f} ms   (target <= 0.01)")
    print(f"a cache miss adds (lookup + store) {out['cache miss']:+.4f} ms   (target <= 0.02)")


if __name__ == "__main__":
    main()
