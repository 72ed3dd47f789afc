"""What the response cache and LoRA adapters cost the gateway, measured side by side in one run:
one gateway (one worker, auth off) over a local Redis and the fast fake engine in its vLLM
adapter mode, in alternating rounds of:

- `base`: non-deterministic requests for a model with the cache off (the baseline),
- `miss-off`: distinct deterministic requests, cache off for the model,
- `miss-on`: the same requests for a model with the cache on (each a miss, then stored),
- `hit`: one deterministic request repeated on the cached model (every one a hit),
- `adapter`: non-deterministic requests for an adapter already loaded on the engine;
- `miss-on-s`, `hit-s`: the cached model's misses and hits, streamed (16 chunks from the engine).

Prints the gateway's CPU time per request (its process, from psutil) for each, as medians over
the rounds, and the figures the issue sets targets for: hit / miss-on (<= 0.5), miss-on -
miss-off (<= 0.02 ms), adapter - base (<= 0.01 ms). CPU is read from the scheduler's per-thread
counts (nanoseconds); the machine is shared, so compare the rounds' spread;
bench/cache_adapters_inprocess.py times the added code itself.

    .venv/bin/python bench/cache_adapters.py [--rounds 5] [--requests 1500] [--baseline /tmp/before]

`--baseline DIR` runs the same gateway from another checkout (`git worktree add --detach
/tmp/before <commit>`) beside this one, each mode on both in turn, so before and after meet the
same moment's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from testkit.procs import Proc, fake_upstream, free_port, gateway  # noqa: E402
from testkit.redis_server import RedisServer  # noqa: E402

SERIAL = count()


def body(mode: str) -> dict[str, Any]:
    n = next(SERIAL)
    streamed = mode.endswith("-s")
    mode = mode.removesuffix("-s")
    messages = [{"role": "user", "content": f"hello {n}" if mode != "hit" else "hello again"}]
    model = {"base": "base", "miss-off": "base", "miss-on": "cached", "hit": "cached", "adapter": "a1"}[mode]
    extra = {"temperature": 0} if mode in ("miss-off", "miss-on", "hit") else {"temperature": 0.7}
    return {"model": model, "messages": messages, "max_tokens": 16, "stream": streamed, **extra}


async def load(url: str, mode: str, requests: int, concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem, session.post(url + "/v1/chat/completions", json=body(mode)) as r:
                await r.read()
                assert r.status == 200, (mode, r.status, await r.text())
                if mode.startswith("hit"):
                    assert r.headers["x-gateway-cache"] == "hit"

        await asyncio.gather(*(one() for _ in range(requests)))


def cpu_seconds(proc: Proc) -> float:
    """CPU time of the gateway's processes and all their threads, from the scheduler's own count
    (/proc/PID/task/TID/schedstat, nanoseconds; psutil's figures come in 10 ms ticks)."""
    assert proc.proc is not None
    root = psutil.Process(proc.proc.pid)
    total = 0
    for p in (root, *root.children(recursive=True)):
        for task in Path(f"/proc/{p.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def baseline_gateway(tmp: Path, config: dict[str, Any], tree: Path) -> Proc:
    """The same gateway from another checkout (a worktree at an earlier commit), on its own keys."""
    config = {**config, "redis": {**config["redis"], "prefix": "baseline"}}
    gw = gateway(tmp, config, name="gw-baseline", workers=1)
    code = f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); runpy.run_module('gateway.cli.main', run_name='__main__')"
    gw.args[1:3] = ["-c", code]  # instead of `-m gateway.cli.main`
    return gw


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--baseline", type=Path, default=None, help="a checkout of an earlier commit, measured alongside")
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    redis = RedisServer(binary, free_port(), tmp).start()
    engine = fake_upstream(tmp, "--model", "base", "--enable-lora", "--max-loras", "4", "--chunks", "16").start()
    (tmp / "adapters" / "a1").mkdir(parents=True)
    config: dict[str, Any] = {
        "redis": {"url": redis.url},
        "auth": {"enabled": False},
        "engines": [{"name": "e", "kind": "openai", "url": engine.url, "max_loras": 4}],
        "models": [
            {"name": "base", "routes": [{"engine": "e", "model": "base"}]},
            {"name": "cached", "routes": [{"engine": "e", "model": "base"}], "cache": True},
        ],
        "cache": {"max_memory": 512 << 20},
        "adapters": {
            "directories": [str(tmp / "adapters")],
            "models": [{"name": "a1", "base": "base", "path": str(tmp / "adapters" / "a1")}],
        },
    }
    gws = {"this": gateway(tmp, config, name="gw-bench", workers=1)}
    if args.baseline is not None:
        gws["baseline"] = baseline_gateway(tmp, config, args.baseline.resolve())
    modes = ["base", "miss-off", "miss-on", "hit", "adapter", "miss-on-s", "hit-s"]
    per: dict[tuple[str, str], list[float]] = {(g, m): [] for g in gws for m in modes}
    try:
        engine.wait_healthy()
        for gw in gws.values():
            gw.start().wait_healthy("/ready", timeout=60)
            for mode in modes:  # warm: the adapter loaded, the connections open
                if not mode.startswith("hit"):
                    asyncio.run(load(gw.url, mode, 200, args.concurrency))
            for mode in ("hit", "hit-s"):  # the repeated request stored
                deadline = time.monotonic() + 5
                url = gw.url + "/v1/chat/completions"
                while httpx.post(url, json=body(mode), timeout=10).headers.get("x-gateway-cache") != "hit":
                    assert time.monotonic() < deadline, "the hit was never stored"
        for r in range(args.rounds):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                for name, gw in gws.items():  # side by side: the same moment's load for both
                    before = cpu_seconds(gw)
                    asyncio.run(load(gw.url, mode, args.requests, args.concurrency))
                    per[name, mode].append((cpu_seconds(gw) - before) / args.requests * 1000)
    finally:
        for gw in gws.values():
            gw.stop()
        engine.stop()
        redis.stop()
    for name in gws:
        report(name, {m: per[name, m] for m in modes}, args)


def report(name: str, per: dict[str, list[float]], args: argparse.Namespace) -> None:
    med = {m: statistics.median(v) for m, v in per.items()}
    print(
        f"{name}: gateway CPU per request, ms (median of {args.rounds} rounds of {args.requests},"
        f" concurrency {args.concurrency}):"
    )
    for m, v in per.items():
        print(f"  {m:9s} {med[m]:.4f}   rounds: {' '.join(f'{x:.4f}' for x in v)}")
    print(f"  hit / miss (cache on), whole:  {med['hit'] / med['miss-on']:.3f}   (target <= 0.5)")
    print(f"  hit / miss (cache on), stream: {med['hit-s'] / med['miss-on-s']:.3f}   (target <= 0.5)")
    print(f"  miss cache on - off:           {med['miss-on'] - med['miss-off']:+.4f} ms   (target <= 0.02)")
    print(f"  adapter - base model:          {med['adapter'] - med['base']:+.4f} ms   (target <= 0.01)")


if __name__ == "__main__":
    main()
