"""What the scheduler adds to a request when the engines have room: the slot taken and given
back through `Scheduler` against the request path before the scheduler existed (the router's
pick and the in-flight count, inline), in-process, on the same router, alternating rounds.

Prints the CPU time per request (pick + release) of each and the difference (target: at most
0.02 ms). Engines with a configured capacity and engines without one (no limit known yet) are
measured apart: the first compare against the limit, the second skip it.

    .venv/bin/python bench/scheduler_overhead.py [--rounds 7] [--requests 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from gateway.access.base import Principal
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import CHAT, parse_request
from gateway.dispatch.routing import Router
from gateway.dispatch.scheduler import Dispatcher, Scheduler
from gateway.engines.pool import Pool
from gateway.settings import parse_settings


def build(max_inflight: int | None, engines: int) -> tuple[Scheduler, Router]:
    extra: dict[str, Any] = {} if max_inflight is None else {"max_inflight": max_inflight}
    names = [f"e{i}" for i in range(engines)]
    s = parse_settings(
        {
            "engines": [
                {"name": n, "kind": "openai", "url": f"http://127.0.0.1:{9000 + i}", **extra}
                for i, n in enumerate(names)
            ],
            "models": [{"name": "m", "routes": [{"engines": names}]}],
            "auth": {"enabled": False},
        },
        env={},
    )
    metrics = GatewayMetrics()
    pool = Pool(s.engines, s.health, metrics)
    for e in pool.engines.values():
        e.healthy = True
    router = Router(pool, s.models, s.routing)
    return Scheduler(s, router, metrics), router


def cpu_per_request_before(router: Router, requests: int) -> float:
    """The request path's engine choice as it was: pick, count in, count out."""
    request = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', CHAT)
    start = time.process_time()
    for _ in range(requests):
        pick = router.pick(request, frozenset())
        assert pick is not None
        pick.engine.outstanding += 1
        pick.engine.outstanding -= 1
    return (time.process_time() - start) / requests * 1e3  # ms


async def cpu_per_request(dispatcher: Dispatcher, requests: int) -> float:
    request = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', CHAT)
    principal = Principal()
    start = time.process_time()
    for _ in range(requests):
        pick = await dispatcher.acquire(request, principal, None)
        assert pick is not None
        dispatcher.release(pick.engine)
    return (time.process_time() - start) / requests * 1e3  # ms


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--requests", type=int, default=100_000)
    args = p.parse_args()
    print(f"{'engines':<26} {'before ms/req':>14} {'scheduler ms/req':>17} {'added ms/req':>13}")
    for label, limit, engines in (
        ("1, max_inflight 64", 64, 1),
        ("4, max_inflight 64", 64, 4),
        ("4, capacity not known", None, 4),
    ):
        on, router = build(limit, engines)
        offs, ons = [], []
        for _ in range(args.rounds):
            offs.append(cpu_per_request_before(router, args.requests))
            ons.append(await cpu_per_request(on, args.requests))
        added = statistics.median(b - a for a, b in zip(offs, ons, strict=True))
        print(f"{label:<26} {statistics.median(offs):>14.4f} {statistics.median(ons):>17.4f} {added:>13.4f}")


if __name__ == "__main__":
    asyncio.run(main())
