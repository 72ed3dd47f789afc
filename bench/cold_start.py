"""Scale to zero: how long does a stopped engine take to give its first token? Cold vs warm, in one run.

A gateway manages one CPU engine (the bundled tiny model, 2 torch threads) with `idle_stop`. Each
round waits until the gateway has stopped the engine (its process gone), then times a streamed
completion from the request to its first token (the engine is started by that request: process
start, imports, model load, first step), then times the same request again on the now running
engine. Figures are medians over the rounds.

    .venv/bin/python bench/cold_start.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.procs import TINY_MODEL, Proc, free_port, gateway

IDLE_STOP = 1.0


def first_token(url: str) -> float:
    body = {"model": "tiny", "prompt": "The software is", "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    elapsed = 0.0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read to the end: the engine finishes its request
            if not elapsed and line.startswith("data: ") and '"text"' in line:
                elapsed = time.perf_counter() - start
    if not elapsed:
        raise RuntimeError("the stream carried no token")
    return elapsed


def wait_stopped(gw: Proc) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(gw.url + "/ready", timeout=10).json()["engine_states"]["cpu-0"] != "stopped":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine never stopped:\n{gw.log_tail()}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-cold-start-"))
    engine = {
        "name": "cpu-0",
        "kind": "cpu",
        "model": str(TINY_MODEL),
        "port": free_port(),
        "args": ["--threads", "2"],
        "idle_stop": IDLE_STOP,
    }
    config = {
        "health": {"interval": 0.5},
        "engines": [engine],
        "models": [{"name": "tiny", "routes": [{"engine": "cpu-0"}]}],
        "auth": {"enabled": False},
    }
    gw = gateway(logs, config, name="cold-start").start()
    cold, warm = [], []
    try:
        gw.wait_healthy("/ready", timeout=180)
        for i in range(args.rounds):
            wait_stopped(gw)
            cold.append(first_token(gw.url))
            warm.append(first_token(gw.url))
            print(f"round {i + 1}: cold {cold[-1]:.2f}s, warm {warm[-1] * 1000:.0f} ms", flush=True)
    finally:
        gw.stop()
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nstopped -> first token: {c:.2f}s median (min {min(cold):.2f}s, max {max(cold):.2f}s)")
    print(f"running -> first token: {w * 1000:.0f} ms median; a cold start costs {c - w:.2f}s")


if __name__ == "__main__":
    main()
