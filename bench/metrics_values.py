"""What a request's metric updates cost a worker: prometheus_client's values in memory (every worker now)
against its multiprocess values (each update written to a per-process mmap file, after an `os.getpid()` system
call: what every worker of `--workers N` paid before the metrics hub), side by side in one run.

A request's updates are those of gateway/proxy/exchange.py for a non-stream answer: the requests counter,
the engine pick, prompt and completion tokens, the latency histogram, the in-flight gauge up and down; with
keys, the key's request and token counters too. Each variant runs in its own interpreter (prometheus_client
chooses its value class at import, from PROMETHEUS_MULTIPROC_DIR); the figure is the best of --repeats
timings of --updates requests' updates, the least disturbed by other work on the machine.

    .venv/bin/python bench/metrics_values.py [--updates 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(updates: int, repeats: int) -> dict[str, float]:
    """Microseconds per request's updates, best of `repeats`; runs in the child interpreter."""
    sys.path.insert(0, str(ROOT))
    from gateway.core.metrics import GatewayMetrics

    m = GatewayMetrics()
    labels = ("m", "e", "200", "v1", "chat")
    requests, picks = m.requests_by[labels], m.routing_by["m", "e"]
    prompt, completion = m.prompt_tokens_by["m", "v1"], m.completion_tokens_by["m", "v1"]
    latency, in_flight = m.latency_by["m", "v1", "chat"], m.in_flight
    key_requests = m.key_requests_by["k1", "200"]
    key_prompt, key_completion = m.key_tokens_by["k1", "prompt"], m.key_tokens_by["k1", "completion"]

    def open_request() -> None:
        in_flight.inc()
        picks.inc()
        in_flight.dec()
        requests.inc()
        latency.observe(0.012)
        prompt.inc(8)
        completion.inc(32)

    def keyed_request() -> None:
        open_request()
        key_requests.inc()
        key_prompt.inc(8)
        key_completion.inc(32)

    out = {}
    for name, one in (("no keys", open_request), ("keys", keyed_request)):
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(updates):
                one()
            best = min(best, time.perf_counter() - began)
        out[name] = best / updates * 1e6
    return out


def run(multiprocess: bool, args: argparse.Namespace) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory() as directory:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        cmd = [sys.executable, __file__, "--child", "--updates", str(args.updates), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=20000, help="requests' updates per timing")
    p.add_argument("--repeats", type=int, default=7, help="timings per variant; the best counts")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.updates, args.repeats)))
        return
    memory, files = run(False, args), run(True, args)
    print(f"{'a request':<10}{'in memory µs':>14}{'multiprocess µs':>17}{'ratio':>8}{'saved µs':>10}")
    for name in memory:
        print(
            f"{name:<10}{memory[name]:>14.2f}{files[name]:>17.2f}"
            f"{files[name] / memory[name]:>7.1f}x{files[name] - memory[name]:>10.2f}"
        )


if __name__ == "__main__":
    main()
