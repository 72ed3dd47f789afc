"""Does prefix-affinity routing help? Least-loaded vs prefix-affinity, side by side in one run.

Two engines (CPU workers with the tiny model, whose continuous-batching cache shares prefix
blocks; or pass --vllm for two vLLM engines with prefix caching) sit behind two gateways that
differ only in `routing.strategy`. The workload is many conversations, each with its own long
system prompt, asking short questions; the figure of merit is time to first token (prefill of a
cached prefix is skipped).

    .venv/bin/python bench/prefix_affinity.py [--rounds 3] [--conversations 8] [--vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.procs import TINY_MODEL, Proc, free_port, gateway, worker  # noqa: E402

WORDS = [
    "license",
    "software",
    "permission",
    "copyright",
    "notice",
    "module",
    "function",
    "python",
    "library",
    "distribution",
]


def system_prompt(i: int, words: int) -> str:
    rng = random.Random(i)
    return f"Conversation {i}. " + " ".join(rng.choice(WORDS) for _ in range(words))


async def ttft(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for _ in r.content.iter_any():
            return time.perf_counter() - start
    return time.perf_counter() - start


async def workload(url: str, args: argparse.Namespace, offset: int) -> list[float]:
    """Conversations offset..offset+N, each `turns` questions; returns every request's TTFT."""
    conversations, turns, concurrency, words = args.conversations, args.turns, args.concurrency, args.words
    jobs = [(offset + c, t) for t in range(turns) for c in range(conversations)]
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one(c: int, t: int) -> float:
            body = {
                "model": "m",
                "messages": [
                    {"role": "system", "content": system_prompt(c, words)},
                    {"role": "user", "content": f"Question {t}?"},
                ],
                "max_tokens": 4,
                "stream": True,
            }
            async with sem:
                return await ttft(session, url, body)

        return await asyncio.gather(*(one(c, t) for c, t in jobs))


def engines(tmp: Path, use_vllm: bool) -> list[Proc]:
    if not use_vllm:
        return [worker(tmp, "--model", str(TINY_MODEL), name=f"pa-{i}").start() for i in range(2)]
    procs = []
    for i in range(2):
        port = free_port()
        args = [
            str(ROOT / ".venv-vllm" / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(TINY_MODEL),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enable-prefix-caching",
            "--served-model-name",
            "tiny-llama",
            "--disable-uvicorn-access-log",
        ]
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(i),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CACHE_ROOT": str(tmp / f"vllm-{i}"),
        }
        procs.append(Proc(f"vllm-{i}", args, port, tmp / f"vllm-{i}.log", env=env).start())
    return procs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--words", type=int, default=500, help="system prompt length in words (~1.5 tokens each)")
    p.add_argument("--vllm", action="store_true")
    args = p.parse_args()

    results: dict[str, list[float]] = {"least_loaded": [], "prefix_affinity": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        backends = engines(tmp, args.vllm)
        gateways: dict[str, Proc] = {}
        try:
            for b in backends:
                b.wait_healthy(timeout=600)
            for strategy in results:
                config = {
                    "health": {"interval": 0.5},
                    "auth": {"enabled": False},
                    "routing": {"strategy": strategy, "max_imbalance": 4},
                    "engines": [{"name": b.name, "kind": "openai", "url": b.url} for b in backends],
                    "models": [
                        {"name": "m", "routes": [{"engines": [b.name for b in backends], "model": "tiny-llama"}]}
                    ],
                }
                gateways[strategy] = gateway(tmp, config, name=f"gw-{strategy}").start().wait_healthy("/ready")
            while not all(httpx.get(g.url + "/ready").json()["engines"].values() for g in gateways.values()):
                time.sleep(0.2)
            for rnd in range(args.rounds):
                for strategy, gw in gateways.items():
                    # New conversation ids each round, so no round reuses another's cached prefixes.
                    offset = (rnd * 2 + list(gateways).index(strategy)) * 1000
                    times = asyncio.run(workload(gw.url, args, offset))
                    results[strategy].append(statistics.median(times) * 1000)
        finally:
            for g in gateways.values():
                g.stop()
            for b in backends:
                b.stop()

    kind = "vLLM (prefix caching)" if args.vllm else "CPU engine (transformers CB, block sharing)"
    print(
        f"{kind}: {args.conversations} conversations x {args.turns} turns, system prompt ~{args.words} words, "
        f"concurrency {args.concurrency}; median TTFT per round, median of {args.rounds} rounds"
    )
    ll = statistics.median(results["least_loaded"])
    pa = statistics.median(results["prefix_affinity"])
    print(f"least_loaded    {ll:8.1f} ms   rounds: {[round(x, 1) for x in results['least_loaded']]}")
    print(f"prefix_affinity {pa:8.1f} ms   rounds: {[round(x, 1) for x in results['prefix_affinity']]}")
    print(f"prefix affinity / least loaded TTFT: {pa / ll:.2f}")


if __name__ == "__main__":
    main()
