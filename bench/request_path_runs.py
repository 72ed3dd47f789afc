"""One measured run of one server for bench/request_path.py: the load, and the CPU it cost.

A run brackets the load with CPU readings of the server's processes (its Redis included), of the upstream,
and of everything on the load generator's core; paced runs also sample the server's RSS every 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench import servers
from bench.gateway_overhead import run_async
from bench.servers import MODEL, Server, Upstream
from testkit.loadgen import closed_loop, paced_streams

JSON_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 32}).encode()
STREAM_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 32,
        "stream": True,
        # Asked for, so the floor and the gateway relay the same chunks (the upstream always sends it then).
        "stream_options": {"include_usage": True},
    }
).encode()


@dataclass
class Run:
    """One measured run of one server: the figures all tables are made of."""

    section: str
    server: str
    round: int
    clients: int  # concurrent clients, or streams held
    units: int  # requests answered, or chunks received
    seconds: float
    rps: float
    failures: int
    errors: dict[str, int]
    cpu_ms: float  # per unit: the server's processes (and its Redis)
    redis_cpu_ms: float  # per unit, the Redis part of cpu_ms
    upstream_cpu_ms: float  # per unit
    client_core_busy: float  # CPU of the load generator, upstream and Redis over the wall time: their core's load
    p50_ms: float = 0.0  # latency (cpu, workers) or gap between chunks (paced, hold)
    p99_ms: float = 0.0
    redis_cmds: float = 0.0  # per unit: commands the server's Redis ran (cpu section)
    held: int = 0  # streams open at once
    completed: int = 0  # streams that ended with every chunk and [DONE]
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def client_core_cpu(server: Server, upstream: Upstream) -> float:
    """CPU of what shares the load generator's core: this process, the upstream, and the server's Redis."""
    return time.process_time() + servers.cpu_seconds([upstream.process]) + server.redis_cpu()


@contextmanager
def started(*group: Server) -> Iterator[list[Server]]:
    """Start the servers together (they boot in parallel), stop them all at the end."""
    ready: list[Server] = []
    try:
        for server in group:
            if server.owns_proc:
                server.proc.start()
        for server in group:
            if server.owns_proc:
                server.proc.wait_healthy(server.ready, timeout=120)
            ready.append(server)
            if server.redis:
                servers.create_key(server)
        yield ready
    finally:
        for server in group:
            server.stop()


def session_for(server: Server, limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0)
    headers = {"content-type": "application/json", **server.headers}
    return aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)


async def closed_run(
    section: str, server: Server, upstream: Upstream, round_: int, clients: int, requests: int, seconds: float
) -> Run:
    url = server.url + "/v1/chat/completions"
    async with session_for(server, clients, aiohttp.ClientTimeout(total=120)) as session:
        # Warm-up on the same session: the connections the measured run uses are open.
        await closed_loop(session, url, JSON_BODY, clients, requests=2 * clients, seconds=30)
        cpu0, redis0, up0 = server.cpu(), server.redis_cpu(), servers.cpu_seconds([upstream.process])
        core0, cmds0 = client_core_cpu(server, upstream), server.redis_commands()
        r = await closed_loop(session, url, JSON_BODY, clients, requests=requests, seconds=seconds)
        cmds = server.redis_commands() - cmds0
        cpu, redis_cpu = server.cpu() - cpu0, server.redis_cpu() - redis0
        up, core = servers.cpu_seconds([upstream.process]) - up0, client_core_cpu(server, upstream) - core0
    n = max(r.requests, 1)
    return Run(
        section, server.name, round_, clients, r.requests, r.seconds, r.rps, r.failures, r.errors,
        cpu_ms=cpu / n * 1e3, redis_cpu_ms=redis_cpu / n * 1e3, upstream_cpu_ms=up / n * 1e3,
        client_core_busy=core / r.seconds, p50_ms=r.p50_ms, p99_ms=r.p99_ms, redis_cmds=cmds / n,
    )  # fmt: skip


async def _sample_rss(server: Server, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with suppress(psutil.Error):
            peak[0] = max(peak[0], server.rss())
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def paced_run(
    section: str, server: Server, upstream: Upstream, round_: int, streams: int, chunks: int, ramp_s: float
) -> Run:
    url = server.url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=120)
    async with session_for(server, streams, timeout) as session:
        rss_before = server.rss()
        peak = [rss_before]
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(_sample_rss(server, peak, stop))
        cpu0, redis0, up0 = server.cpu(), server.redis_cpu(), servers.cpu_seconds([upstream.process])
        core0 = client_core_cpu(server, upstream)
        # chunks + 1: the usage chunk counts as one.
        r = await paced_streams(session, url, STREAM_BODY, streams, chunks=chunks + 1, ramp_s=ramp_s)
        cpu, redis_cpu = server.cpu() - cpu0, server.redis_cpu() - redis0
        up, core = servers.cpu_seconds([upstream.process]) - up0, client_core_cpu(server, upstream) - core0
        stop.set()
        await sampler
    n = max(r.chunks, 1)
    mib = 1024 * 1024
    return Run(
        section, server.name, round_, streams, r.chunks, r.seconds, r.chunks / r.seconds, r.streams - r.completed,
        r.errors, cpu_ms=cpu / n * 1e3, redis_cpu_ms=redis_cpu / n * 1e3, upstream_cpu_ms=up / n * 1e3,
        client_core_busy=core / r.seconds, p50_ms=r.gap_p50_ms, p99_ms=r.gap_p99_ms, held=r.held_at_once,
        completed=r.completed, rss_before_mib=rss_before / mib, rss_peak_mib=peak[0] / mib,
    )  # fmt: skip


def warm_up(group: list[Server], run: Callable[..., Coroutine[Any, Any, Run]]) -> None:
    """The first requests of every server at once: imports, caches, the tokenizer, connection pools."""

    async def all_of_them() -> None:
        await asyncio.gather(*(run(server=s) for s in group))

    run_async(all_of_them)


def log_run(r: Run) -> None:
    unit = "req" if r.section in ("cpu", "workers", "upstreams-json") else "chunk"
    line = (
        f"  {r.section:<8} {r.server:<16} round {r.round + 1} n={r.clients:<5} {r.rps:9.0f} {unit}/s"
        f"  CPU {r.cpu_ms:.4f} ms/{unit}"
        + (f" (redis {r.redis_cpu_ms:.4f})" if r.redis_cpu_ms else "")
        + f"  upstream {r.upstream_cpu_ms:.4f}  client core {r.client_core_busy:.0%}"
    )
    if r.held:
        line += f"  held {r.held} done {r.completed}/{r.clients} RSS {r.rss_before_mib:.0f}->{r.rss_peak_mib:.0f} MiB"
    if r.failures:
        line += f"  FAILURES {r.errors}"
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Sections
