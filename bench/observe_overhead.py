"""What observability costs per request: tracing off / on at 100% / at 1%, the access log on / off.

Two measurements, each with every variant in the same run, alternating, medians over rounds:

- `hooks` (in-process, precise): the calls the request path makes on a request's observation
  (gateway/observe/: begin, the exchange's notes, end; the exemplar observation), timed with
  `time.process_time()` over many requests, so the SDK's export thread (protobuf encoding, the POST
  to a collector) is counted too; each run ends with a flush of the spans and the access log lines.
  The cost of a variant is its time minus the same loop with observing off (`gw.observe is None`:
  the checks the request path makes and nothing else), which is itself shown against an empty loop.
- `server` (end to end, noisier): `llm-gateway serve` pinned to one core, for each variant, a
  closed loop of non-streamed chat requests against the fake upstream (bench/request_path_runs.py):
  the server's CPU per request (all its threads) and the p50 latency. `dead collector` points the
  exporter at a port where nothing listens: latency must not change; its spans are dropped, counted.

The collector is a minimal OTLP/HTTP sink (this file with `--collector PORT`), pinned with the client.

    .venv/bin/python bench/observe_overhead.py [--rounds 5] [--requests 20000] [--sections hooks,server]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import servers
from bench.gateway_overhead import run_async
from bench.request_path_runs import closed_run, started
from bench.servers import free_port

VARIANTS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "off": lambda collector, log: {"logging": {"access": {"enabled": False}}},
    "access log": lambda collector, log: {"logging": {"access": {"file": log}}},
    "tracing 100%": lambda collector, log: {
        "logging": {"access": {"enabled": False}},
        "tracing": {"endpoint": collector, "sample_ratio": 1.0},
    },
    "tracing 1%": lambda collector, log: {
        "logging": {"access": {"enabled": False}},
        "tracing": {"endpoint": collector, "sample_ratio": 0.01},
    },
}
DEAD = "dead collector"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens there
LOOP_SHARE: list[float] = []  # the last run's CPU per request on the request path's thread alone


def collector(port: int) -> None:
    """A minimal OTLP/HTTP sink: reads each export and answers an empty ExportTraceServiceResponse."""

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()  # a connection kept by each gateway


# ---- hooks: in-process ------------------------------------------------------------------------


def _settings(extra: dict[str, Any]) -> Any:
    from gateway.settings import parse_settings

    base = {
        "engines": [{"name": "fake", "kind": "openai", "url": "http://127.0.0.1:1"}],
        "models": [{"name": "m", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }
    return parse_settings({**base, **extra}, "bench", env={})


async def _hooks_run(extra: dict[str, Any], requests: int) -> float:
    """CPU seconds per request of the observing calls one request makes (all threads of this process)."""
    from gateway.access.base import Usage
    from gateway.core.metrics import GatewayMetrics
    from gateway.core.request import CHAT, ApiRequest
    from gateway.observe.observer import CURRENT, Observer

    settings = _settings(extra)
    metrics = GatewayMetrics()
    observer = Observer.build(settings, metrics)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"user-agent", b"bench")],
    }
    request = ApiRequest(CHAT, "m", {"model": "m", "messages": []})
    usage = Usage(8, 32, True)
    latency = metrics.latency_by
    now = time.perf_counter
    start, start_loop = time.process_time(), time.thread_time()
    for i in range(requests):
        rid = b"%032x" % i
        # the front middleware and the exchange, as they call in (gateway/front, gateway/proxy)
        if observer is None:
            obs = None
        elif (obs := observer.begin(scope, rid)) is not None:
            token = CURRENT.set(obs)
        if obs is not None:
            obs.note_caller(None, None, "normal")
            obs.note_request(None, None, "normal", request)
            obs.admit_start = now()
            obs.note_admitted([])
            obs.note_queue(0)
            obs.queue_end = now()
            obs.note_upstream("v1", "fake", "m", ())
            obs.upstream_headers = now()
            obs.settle_start = now()
            obs.settle_end = now()
            obs.note_outcome(200, None, usage, 0.001, "stop", False)
        trace_id = obs.exemplar() if obs is not None else None
        if trace_id is None:
            latency["m", "v1", "chat"].observe(0.01)
        else:
            metrics.observe(latency, ("m", "v1", "chat"), 0.01, trace_id)
        if obs is not None:
            obs.status, obs.bytes_out = 200, 1000
            CURRENT.reset(token)
            observer.end(obs)  # type: ignore[union-attr]
        if i % 256 == 0:
            await asyncio.sleep(0)  # the access log's flush timer may run
    on_loop = time.thread_time() - start_loop  # the request path's share: this thread's CPU
    if observer is not None:
        if observer.access is not None:
            observer.access.flush()
        if observer.tracing is not None:
            assert observer.tracing.flush(60), "the spans were not all exported within a minute"
    spent = time.process_time() - start  # every thread of the process: the export thread's work too
    lost = {r: metrics.trace_spans_dropped.labels(r)._value.get() for r in ("queue_full", "export_failed")}
    if any(lost.values()) and DEAD_ENDPOINT not in str(extra):
        raise SystemExit(f"spans not exported ({lost}): the export cost would be undercounted")
    if observer is not None:
        await observer.stop()
    LOOP_SHARE.append(on_loop / requests)
    return spent / requests


async def _empty_run(requests: int) -> float:
    """The same loop without the observing calls or checks: the histogram observation every request makes."""
    from gateway.core.metrics import GatewayMetrics

    latency = GatewayMetrics().latency_by
    start = time.process_time()
    for i in range(requests):
        latency["m", "v1", "chat"].observe(0.01)
        if i % 256 == 0:
            await asyncio.sleep(0)
    return (time.process_time() - start) / requests


def hooks(args: argparse.Namespace, collector_url: str, tmp: Path) -> dict[str, float]:
    variants = {name: make(collector_url, str(tmp / "access-hooks.log")) for name, make in VARIANTS.items()}
    for extra in variants.values():
        if "tracing" in extra:  # the loop outruns any exporter: a queue that holds the whole run
            extra["tracing"]["queue_size"] = 8 * args.requests  # so every span is exported, and counted
    variants[DEAD] = {"logging": {"access": {"enabled": False}}, "tracing": {"endpoint": DEAD_ENDPOINT}}
    per: dict[str, list[float]] = {name: [] for name in [*variants, "empty loop"]}
    loop: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, extra in variants.items():
            per[name].append(run_async(lambda extra=extra: _hooks_run(extra, args.requests)))
            loop[name].append(LOOP_SHARE[-1])
        per["empty loop"].append(run_async(lambda: _empty_run(args.requests)))
        print(f"  hooks round {r + 1}: " + ", ".join(f"{n} {v[-1] * 1e3:.4f}" for n, v in per.items()), flush=True)
    medians = {name: statistics.median(v) * 1e3 for name, v in per.items()}
    on_loop = {name: statistics.median(v) * 1e3 for name, v in loop.items()}
    print("\nhooks: CPU per request (ms), all threads (the export thread's too), median of rounds;")
    print("extra = minus `off`; request path = the loop's own thread, minus its `off`")
    for name, ms in medians.items():
        base = medians["empty loop"] if name == "off" else medians["off"]
        against = "empty loop" if name == "off" else "off"
        if name != "empty loop":
            path = f"   request path {on_loop[name] - on_loop['off']:+.4f}" if name != "off" else ""
            print(f"  {name:<16} {ms:.4f}   extra {ms - base:+.4f} (vs {against}){path}")
    return medians


# ---- server: end to end -----------------------------------------------------------------------


def server(args: argparse.Namespace, collector_url: str, tmp: Path) -> None:
    upstream = servers.start_upstream("fake", tmp, chunks=8, pace_ms=0, cpus=args.client_core)
    dead = f"http://127.0.0.1:{free_port()}"
    variants = {
        name: make(collector_url, str(tmp / f"access-{i}.log")) for i, (name, make) in enumerate(VARIANTS.items())
    }
    variants[DEAD] = {"logging": {"access": {"enabled": False}}, "tracing": {"endpoint": dead}}
    group = [servers.gateway(tmp, upstream.json_url, args.server_core, name=n, extra=e) for n, e in variants.items()]
    cpu: dict[str, list[float]] = {s.name: [] for s in group}
    p50: dict[str, list[float]] = {s.name: [] for s in group}
    try:
        with started(*group) as ready:
            for r in range(args.rounds):
                order = ready[r % len(ready) :] + ready[: r % len(ready)]
                for s in order:
                    run = run_async(
                        lambda s=s, r=r: closed_run("cpu", s, upstream, r, args.clients, args.server_requests, 60)
                    )
                    cpu[s.name].append(run.cpu_ms)
                    p50[s.name].append(run.p50_ms)
                    print(f"  server round {r + 1} {s.name:<16} CPU {run.cpu_ms:.4f} ms/req  p50 {run.p50_ms:.3f} ms"
                          + (f"  FAILURES {run.errors}" if run.failures else ""), flush=True)  # fmt: skip
            dropped = {s.name: _dropped(s) for s in ready if "tracing" in s.name or s.name == DEAD}
    finally:
        upstream.stop()
    off = statistics.median(cpu["off"])
    print(f"\nserver: CPU per request (ms) and p50 latency, median of {args.rounds} rounds, {args.clients} clients")
    for name in cpu:
        c, p = statistics.median(cpu[name]), statistics.median(p50[name])
        spread = max(cpu[name]) - min(cpu[name])
        print(f"  {name:<16} CPU {c:.4f} (vs off {c - off:+.4f}, spread {spread:.4f})  p50 {p:.3f} ms")
    for name, counts in dropped.items():
        print(f"  {name}: spans not exported {counts or 'none'}")


def _dropped(s: servers.Server) -> dict[str, float]:
    import httpx

    text = httpx.get(s.url + "/metrics", timeout=5).text
    return {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_trace_spans_dropped_total{")
    }


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collector", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sections", default="hooks,server")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20000, help="hooks: requests per run")
    p.add_argument("--server-requests", type=int, default=6000, help="server: requests per run")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--server-core", default="1")
    p.add_argument("--client-core", default="0")
    args = p.parse_args()
    if args.collector:
        collector(args.collector)
        return
    port = free_port()
    sink = subprocess.Popen(servers.pinned([sys.executable, __file__, "--collector", str(port)], args.client_core))
    collector_url = f"http://127.0.0.1:{port}"
    _wait_listening(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sections = args.sections.split(",")
            if "hooks" in sections:
                hooks(args, collector_url, Path(tmp))
            if "server" in sections:
                server(args, collector_url, Path(tmp))
    finally:
        sink.terminate()
        sink.wait(5)


if __name__ == "__main__":
    main()
