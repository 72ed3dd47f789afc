"""What the inference log costs and whether it keeps up, on SQLite and on PostgreSQL, in one run.

1. Request path, in process: the CPU of what the exchange does per request (build a LogEntry,
   `InferenceLog.add`), and the writer's CPU per row (conversion + `append_requests`, driver
   threads included; PostgreSQL's own server CPU is not), each over many rows.
2. End to end: three gateways in front of the fast fake engine (log off; log on SQLite; log on
   PostgreSQL), the same closed-loop load on each, alternated for `--rounds`; the gateway's CPU
   per request (user+system of its process tree, psutil) and the difference to "off".
3. Keeping up: an InferenceLog with the default settings fed by a synthetic producer at
   `--rate` rows/s (3,000) for `--seconds`, per backend: rows/s written, rows dropped, the most
   rows held at once, the event loop's worst lag; then the writer's ceiling, 100,000 rows added
   at once (buffer raised to hold them) and the time until all are written.

    .venv/bin/python bench/inference_log.py [--rounds 3] [--requests 2000] [--concurrency 16]
        [--rate 3000] [--seconds 10] [--postgres postgresql://postgres@127.0.0.1:5432] [--parts 1,2,3]

PostgreSQL: a database of its own is created on the server given and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench.quota_overhead import cpu_seconds, load
from gateway.core.metrics import GatewayMetrics
from gateway.monitor.writer import InferenceLog, LogEntry
from gateway.settings import InferenceLogSettings, ModelSettings, RouteSettings
from gateway.store import Store, open_store
from testkit.procs import fake_upstream, gateway

MODEL = ModelSettings("fake", (RouteSettings(("fake",), "fake"),))
TARGET_MS = 0.03  # added gateway CPU per request with the log on


def entry(i: int, now: float) -> LogEntry:
    return LogEntry(
        now, b"0123456789abcdef0123456789abcdef", "key_0123456789abcdef", "fake", "v1", "fake", 200, None,
        bool(i & 1), 12, 32, 0.004 if i & 1 else None, 0.012, "length", False, None,
    )  # fmt: skip


# Databases ------------------------------------------------------------------------------------


@asynccontextmanager
async def databases(tmp: Path, postgres: str | None) -> AsyncIterator[dict[str, str]]:
    """URLs by backend: a SQLite file under tmp, and a fresh PostgreSQL database when reachable."""
    urls = {"sqlite": f"sqlite:///{tmp}/bench.db"}
    name = f"gateway_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = None
    if postgres:
        try:
            admin = await asyncpg.connect(f"{postgres}/postgres", timeout=5)
            await admin.execute(f'CREATE DATABASE "{name}"')
            urls["postgresql"] = f"{postgres}/{name}"
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            print(f"PostgreSQL at {postgres} not usable, skipped: {exc}")
    try:
        yield urls
    finally:
        if admin is not None:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


# 1. Request path and writer CPU ---------------------------------------------------------------


async def request_path_cost(n: int = 200_000) -> float:
    """CPU microseconds per request of what the exchange does: build the entry and add it."""
    log = InferenceLog(InferenceLogSettings(buffer_size=n + 1, flush_rows=n + 1), (MODEL,), GatewayMetrics())
    now = time.time()
    started = time.process_time()
    for i in range(n):
        log.add(entry(i, now))
    return (time.process_time() - started) / n * 1e6


async def writer_cost(url: str, tmp: Path, n: int = 60_000) -> float:
    """CPU microseconds per row of the writer: conversion and append_requests (driver threads too)."""
    store = await open_store(url, tmp)
    try:
        log = InferenceLog(InferenceLogSettings(buffer_size=n + 1, flush_rows=n + 1), (MODEL,), GatewayMetrics())
        log.start(store)
        now = time.time()
        for i in range(n):
            log.add(entry(i, now))
        started = time.process_time()
        while log.held:
            await log.flush()
        cost = (time.process_time() - started) / n * 1e6
        await log.stop()
        return cost
    finally:
        await store.close()


# 3. Keeping up --------------------------------------------------------------------------------


async def keep_up(store: Store | None, rate: int, seconds: float) -> dict[str, float]:
    """Without a store: the producer alone (rows only buffered), for the loop lag it causes itself."""
    metrics = GatewayMetrics()
    settings = InferenceLogSettings() if store else InferenceLogSettings(buffer_size=10**7, flush_rows=10**7)
    log = InferenceLog(settings, (MODEL,), metrics)
    if store is not None:
        log.start(store)
    lags: list[float] = []
    most_held = 0
    done = asyncio.Event()

    async def ticker() -> None:  # the event loop's lag: how late a 5 ms sleep wakes up
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    per_tick = rate // 100  # every 10 ms
    total = int(rate * seconds)
    started = time.perf_counter()
    added = 0
    while added < total:
        now = time.time()
        for _ in range(min(per_tick, total - added)):
            log.add(entry(added, now))
            added += 1
        most_held = max(most_held, log.held)
        next_at = started + added / rate
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    produced = time.perf_counter() - started
    if store is None:
        log._buffer.clear()
    # Polled: nothing signals an empty buffer, and the writer keeps its own pace.
    while log.held:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    drained = time.perf_counter() - started
    done.set()
    await tick
    if store is not None:
        await log.stop()
    written, dropped = counted(metrics.inference_log_written), counted(metrics.inference_log_dropped)
    lags.sort()
    return {
        "offered_rows_per_s": added / produced,
        "written_rows_per_s": written / drained,
        "written": written,
        "dropped": dropped,
        "most_held": most_held,
        "drain_after_s": drained - produced,
        "loop_lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
        "loop_lag_max_ms": lags[-1] * 1000,
    }


def counted(counter: Any) -> float:
    return float(next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total")))


async def ceiling(store: Store, rows: int = 100_000) -> float:
    log = InferenceLog(InferenceLogSettings(buffer_size=rows + 1, flush_rows=rows + 1), (MODEL,), GatewayMetrics())
    log.start(store)
    now = time.time()
    for i in range(rows):
        log.add(entry(i, now))
    started = time.perf_counter()
    while log.held:
        await log.flush()
    elapsed = time.perf_counter() - started
    await log.stop()
    return rows / elapsed


# 2. End to end --------------------------------------------------------------------------------


def end_to_end(tmp: Path, urls: dict[str, str], rounds: int, requests: int, concurrency: int) -> dict[str, Any]:
    up = fake_upstream(tmp, "--model", "fake", name="fake-log").start().wait_healthy()
    base = {
        "engines": [{"name": "fake", "kind": "openai", "url": up.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }
    off = {**base, "store": {"url": f"sqlite:///{tmp}/off.db"}, "inference_log": {"enabled": False}}
    gateways = {"off": gateway(tmp, off, name="gw-off")}
    for backend, url in urls.items():
        store = f"sqlite:///{tmp}/on.db" if backend == "sqlite" else url
        gateways[f"on ({backend})"] = gateway(tmp, {**base, "store": {"url": store}}, name=f"gw-{backend}")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in gateways}
    try:
        for g in gateways.values():
            g.start().wait_healthy("/ready", timeout=60)
        for g in gateways.values():
            asyncio.run(load(g.url, 500, concurrency, None))  # warm-up: pools, caches, the first writes
        for _ in range(rounds):
            for name, g in gateways.items():
                cpu0 = cpu_seconds(g)
                rate = asyncio.run(load(g.url, requests, concurrency, None))
                time.sleep(0.6)  # let the last rows be written: their CPU counts too
                results[name].append((rate, (cpu_seconds(g) - cpu0) / requests * 1000))
    finally:
        for g in gateways.values():
            g.stop()
        up.stop()
    return results


# Main -----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--parts", default="1,2,3")
    args = p.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        async def in_process(urls: dict[str, str]) -> None:
            if 1 in parts:
                print(f"request path (LogEntry + add): {await request_path_cost():.2f} µs CPU per request")
                for backend, url in urls.items():
                    print(f"writer, {backend}: {await writer_cost(url, tmp):.2f} µs CPU per row (conversion + append)")
            if 3 in parts:
                r = await keep_up(None, args.rate, args.seconds)
                print(
                    f"producer alone (no writer), {r['offered_rows_per_s']:,.0f} rows/s: "
                    f"loop lag p99 {r['loop_lag_p99_ms']:.1f} ms max {r['loop_lag_max_ms']:.1f} ms"
                )
                for backend, url in urls.items():
                    store = await open_store(url, tmp)
                    try:
                        r = await keep_up(store, args.rate, args.seconds)
                        print(
                            f"keep-up, {backend}: offered {r['offered_rows_per_s']:,.0f} rows/s for {args.seconds:g} s, "
                            f"written {r['written']:,.0f} ({r['written_rows_per_s']:,.0f} rows/s), dropped {r['dropped']:,.0f}, "
                            f"most held {r['most_held']:,.0f}, drained {r['drain_after_s']:.2f} s after the last, "
                            f"loop lag p99 {r['loop_lag_p99_ms']:.1f} ms max {r['loop_lag_max_ms']:.1f} ms"
                        )
                        print(f"ceiling, {backend}: {await ceiling(store):,.0f} rows/s (100,000 rows added at once)")
                    finally:
                        await store.close()

        async def with_databases(work: Callable[[dict[str, str]], Any]) -> Any:
            async with databases(tmp, args.postgres) as urls:
                return await work(urls) if asyncio.iscoroutinefunction(work) else work(urls)

        asyncio.run(with_databases(in_process))
        if 2 in parts:

            async def e2e(urls: dict[str, str]) -> dict[str, Any]:
                return await asyncio.to_thread(end_to_end, tmp, urls, args.rounds, args.requests, args.concurrency)

            results = asyncio.run(with_databases(e2e))
            print(
                f"end to end: fake engine, {args.requests} non-streaming requests at {args.concurrency} clients, "
                f"median of {args.rounds} rounds"
            )
            off = statistics.median(cpu for _, cpu in results["off"])
            print(f"{'gateway':<18}{'req/s':>8}{'CPU ms/req':>12}{'vs off':>10}{'per round (ms/req)':>36}")
            for name, runs in results.items():
                rate, cpu = statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)
                rounds = ", ".join(f"{c:.3f}" for _, c in runs)
                print(f"{name:<18}{rate:>8.0f}{cpu:>12.3f}{cpu - off:>+10.3f}{rounds:>36}")
            print(f"target: the log adds at most {TARGET_MS} ms of gateway CPU per request")


if __name__ == "__main__":
    main()
