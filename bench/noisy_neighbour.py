"""Noisy neighbour: one key floods a saturated engine while another sends one request at a time.
The scheduler on (fair share) and off (first come, first served in the engine's own queue),
side by side in one run, alternating rounds.

Each mode has its own gateway (keys and quotas on, one private Redis for both) in front of its
own fake engine with a fixed capacity and service time (testkit/fake_upstream.py `--capacity
--service-ms --first-token-ms`). Per round and mode:

1. idle: key B alone sends `--idle-requests` streams one after another; its time to first token
   (the first SSE chunk) is B's baseline;
2. noisy: key A keeps `--flood` streams in flight (each of its loops sends the next as soon as
   one ends); after `--warmup-s`, for `--window-s` seconds key B again sends one stream at a
   time. B's time to first token is reported relative to the idle baseline (p50, p99), and the
   total throughput (the answer bytes A and B received in the window, in streams' worth per
   second) relative to the scheduler-off run of the same round.

Modes: `on` (max_inflight set to the engine's capacity), `learned` (no max_inflight: capacity
learned from the engine's running/waiting figures), `off` (scheduler.enabled: false).

    .venv/bin/python bench/noisy_neighbour.py [--rounds 3] [--modes on,off] [--capacity 16]
        [--service-ms 400] [--service-spread 0.5] [--first-token-ms 100] [--flood 64] [--window-s 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.procs import Proc, fake_upstream, free_port, gateway
from testkit.redis_server import RedisServer

ADMIN = "bench-admin"
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": True}


@dataclass
class Run:
    idle_ttft: list[float] = field(default_factory=list)
    noisy_ttft: list[float] = field(default_factory=list)
    throughput: float = 0.0  # streams' worth of answer bytes per second in the window, A and B together
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass
class Meter:
    """Bytes of answers received while the window is open: every stream carries the same
    bytes, spread over its service time, so this measures work done far more finely than
    counting the streams that happen to end inside the window."""

    counting: bool = False
    bytes: int = 0


async def stream(session: aiohttp.ClientSession, url: str, meter: Meter | None = None) -> tuple[float, int]:
    """Time to the first chunk, and the bytes of the answer."""
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=BODY) as r:
        assert r.status == 200, (r.status, await r.text())
        first = 0.0
        size = 0
        async for data in r.content.iter_any():
            if not first:
                first = time.perf_counter() - start
            size += len(data)
            if meter is not None and meter.counting:
                meter.bytes += len(data)
        return first, size


async def one_mode(url: str, key_a: str, key_b: str, args: argparse.Namespace) -> Run:
    run = Run()
    a_headers = {"authorization": f"Bearer {key_a}"}
    b_headers = {"authorization": f"Bearer {key_b}"}
    async with (
        aiohttp.ClientSession(headers=b_headers, connector=aiohttp.TCPConnector(limit=0)) as b,
        aiohttp.ClientSession(headers=a_headers, connector=aiohttp.TCPConnector(limit=0)) as a,
    ):
        size = 0
        for _ in range(args.idle_requests):
            ttft, size = await stream(b, url)
            run.idle_ttft.append(ttft)
        meter = Meter()
        stop = False

        async def flood_loop() -> None:
            while not stop:
                await stream(a, url, meter)

        flood = [asyncio.ensure_future(flood_loop()) for _ in range(args.flood)]
        await asyncio.sleep(args.warmup_s)
        meter.counting = True
        start = time.perf_counter()
        while time.perf_counter() - start < args.window_s:
            run.noisy_ttft.append((await stream(b, url, meter))[0])
        meter.counting = False
        run.throughput = meter.bytes / size / (time.perf_counter() - start)  # streams' worth per second
        stop = True
        await asyncio.gather(*flood)
    return run


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--service-ms", type=float, default=400)
    ap.add_argument("--first-token-ms", type=float, default=100)
    ap.add_argument("--service-spread", type=float, default=0.5)
    ap.add_argument("--flood", type=int, default=64)
    ap.add_argument("--idle-requests", type=int, default=8)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--window-s", type=float, default=8.0)
    args = ap.parse_args()
    modes = args.modes.split(",")
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (scripts/setup.sh installs it)"

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(binary, free_port(), tmp).start()
        procs: list[Proc] = []
        gateways: dict[str, tuple[Proc, Proc]] = {}
        results: dict[str, list[Run]] = {m: [] for m in modes}
        try:
            fake_args = ["--chunks", "16", "--capacity", str(args.capacity)]
            fake_args += ["--service-ms", str(args.service_ms), "--first-token-ms", str(args.first_token_ms)]
            fake_args += ["--service-spread", str(args.service_spread)]
            for mode in modes:
                engine = fake_upstream(tmp, *fake_args, name=f"fake-{mode}").start()
                procs.append(engine)
                limit = {"max_inflight": args.capacity} if mode == "on" else {}
                config = {
                    "health": {"interval": 0.5},
                    "redis": {"url": redis_server.url},
                    "auth": {"enabled": True},
                    "scheduler": {"enabled": mode != "off", "max_queue_wait": 60},
                    "engines": [{"name": "fake", "kind": "openai", "url": engine.url, **limit}],
                    "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
                }
                gw = gateway(tmp, config, name=f"gw-{mode}", env={"GATEWAY_ADMIN_KEY": ADMIN}).start()
                procs.append(gw)
                gateways[mode] = (gw, engine)
            for gw, engine in gateways.values():
                engine.wait_healthy()
                gw.wait_healthy("/ready", timeout=60)
            first = next(iter(gateways.values()))[0]
            keys = [
                httpx.post(
                    first.url + "/admin/keys", json={"name": n}, headers={"authorization": f"Bearer {ADMIN}"}
                ).json()["key"]
                for n in ("A", "B")
            ]
            for r in range(args.rounds):
                for mode in modes if r % 2 == 0 else reversed(modes):
                    gw, engine = gateways[mode]
                    httpx.post(engine.url + "/stats/reset")
                    run = asyncio.run(one_mode(gw.url, keys[0], keys[1], args))
                    run.engine = httpx.get(engine.url + "/stats").json()
                    results[mode].append(run)
                    print(
                        f"round {r + 1} {mode:>7}: B ttft idle p50 {statistics.median(run.idle_ttft) * 1e3:.1f} ms, "
                        f"noisy p50 {statistics.median(run.noisy_ttft) * 1e3:.1f} ms "
                        f"p99 {p(run.noisy_ttft, 0.99) * 1e3:.1f} ms (n={len(run.noisy_ttft)}), "
                        f"{run.throughput:.2f} streams/s, engine max running {run.engine['max_running']} "
                        f"max waiting {run.engine['max_waiting']}",
                        flush=True,
                    )
        finally:
            for proc in procs:
                proc.stop()
            redis_server.stop()

    print(
        f"\nfake engine: capacity {args.capacity}, service {args.service_ms:g} ms ± {args.service_spread:.0%}, "
        f"first token {args.first_token_ms:g} ms; A keeps {args.flood} streams in flight; medians of {args.rounds} rounds"
    )
    off = results.get("off")
    print(
        f"{'mode':>8} {'B idle p50 ms':>14} {'B p50 x idle':>13} {'B p99 x idle':>13} {'streams/s':>10} {'vs off':>7}"
    )
    for mode in modes:
        runs = results[mode]
        idle = statistics.median(statistics.median(r.idle_ttft) for r in runs)
        p50 = statistics.median(statistics.median(r.noisy_ttft) / statistics.median(r.idle_ttft) for r in runs)
        p99 = statistics.median(p(r.noisy_ttft, 0.99) / statistics.median(r.idle_ttft) for r in runs)
        tput = statistics.median(r.throughput for r in runs)
        ratio = "-"
        if off:  # each round against the off run of the same round, then the median: the machine drifts
            ratio = f"{statistics.median(r.throughput / o.throughput for r, o in zip(runs, off, strict=True)):.1%}"
        print(f"{mode:>8} {idle * 1e3:>14.1f} {p50:>13.2f} {p99:>13.2f} {tput:>10.2f} {ratio:>7}")
    print("targets: with the scheduler, B p50 <= 1.5x idle and throughput >= 98% of scheduler off")


if __name__ == "__main__":
    main()
