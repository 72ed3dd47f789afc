"""Batch inference, side by side in one run: throughput, interactive latency under a batch, memory.

- `throughput`: the tiny CPU engine saturated by direct concurrent requests vs the same lines
  run as a batch through the gateway (its runner at the same concurrency): generated tokens/s,
  rounds alternating, medians. The batch time runs from `batches.create` returning to the client
  seeing `completed` (finalize and polling included).
- `ttft`: an interactive client's time to first token (streamed, one request at a time) on the
  idle engine (half before the batch, half after) and while a 2,000-line batch runs, for each
  `--ttft-concurrency` (the runner's lines in flight; a gateway each). The batch is cancelled
  after the measurement.
- `memory`: the gateway's RSS (sampled every 50 ms) while a 100,000-line file is uploaded,
  validated and stored, run against the fast fake engine, finalized, and downloaded; then while
  a 200 MiB file is uploaded and read back.

    .venv/bin/python bench/batch_inference.py [--sections throughput,ttft,memory] [--rounds 2]
        [--lines 640] [--tokens 32] [--concurrency 16] [--ttft-concurrency 16,4,1]
        [--memory-lines 100000] [--upload-mb 200] [--store-url sqlite:///bench.db]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.procs import TINY_MODEL, Proc, fake_upstream, gateway, worker

MODEL = "tiny-llama"
FINAL = ("completed", "failed", "expired", "cancelled")


def completion_body(i: int, tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"The software number {i} is", "max_tokens": tokens, "ignore_eos": True}


def batch_file(n: int, tokens: int, model: str = MODEL) -> bytes:
    lines = (
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {**completion_body(i, tokens), "model": model},
        }
        for i in range(n)
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@contextmanager
def gateway_for(tmp: Path, engine_url: str, model: str, batch: dict[str, Any], name: str, store: str) -> Iterator[Proc]:
    config = {
        "health": {"interval": 1.0},
        "auth": {"enabled": False},
        "engines": [{"name": "engine", "kind": "openai", "url": engine_url}],
        "models": [{"name": model, "routes": [{"engine": "engine", "model": model}]}],
        "store": {"url": store, "data_dir": str(tmp / name)},
        "files": {"max_bytes": 512 * 1024 * 1024},
        "batch": {"poll_interval": 0.2, **batch},
    }
    proc = gateway(tmp, config, name=name).start()
    try:
        yield proc.wait_healthy("/ready", timeout=90)
    finally:
        proc.stop()


def submit(client: httpx.Client, data: bytes, endpoint: str = "/v1/completions") -> dict[str, Any]:
    r = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("bench.jsonl", data)})
    r.raise_for_status()
    r = client.post(
        "/v1/batches", json={"input_file_id": r.json()["id"], "endpoint": endpoint, "completion_window": "24h"}
    )
    r.raise_for_status()
    return dict(r.json())


def wait(client: httpx.Client, batch_id: str, until: tuple[str, ...] = FINAL, poll: float = 0.1) -> dict[str, Any]:
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in until:
            return dict(batch)
        time.sleep(poll)


def output_tokens(client: httpx.Client, batch: dict[str, Any]) -> int:
    text = client.get(f"/v1/files/{batch['output_file_id']}/content").text
    return sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in text.splitlines())


async def direct_run(url: str, n: int, tokens: int, concurrency: int) -> float:
    """Tokens/s of n non-streaming requests sent by `concurrency` clients straight to the engine."""
    queue = list(range(n))
    total = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client() -> None:
            nonlocal total
            while queue:
                i = queue.pop()
                async with session.post(url + "/v1/completions", json=completion_body(i, tokens)) as r:
                    total += (await r.json())["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def throughput(tmp: Path, engine: Proc, args: argparse.Namespace) -> None:
    batch_cfg = {"concurrency": args.concurrency, "claim_size": 8}
    with gateway_for(tmp, engine.url, MODEL, batch_cfg, "gw-throughput", args.store_url) as gw:
        client = httpx.Client(base_url=gw.url, timeout=600)
        asyncio.run(direct_run(engine.url, args.concurrency, 8, args.concurrency))  # warm-up
        direct, batched = [], []
        for _ in range(args.rounds):
            direct.append(asyncio.run(direct_run(engine.url, args.lines, args.tokens, args.concurrency)))
            created = submit(client, batch_file(args.lines, args.tokens))
            start = time.perf_counter()
            done = wait(client, created["id"])
            elapsed = time.perf_counter() - start
            assert done["status"] == "completed", done
            batched.append(output_tokens(client, done) / elapsed)
        d, b = statistics.median(direct), statistics.median(batched)
        print(
            f"\nthroughput: {args.lines} lines x {args.tokens} tokens, {args.concurrency} in flight, {args.rounds} rounds"
        )
        print(f"  direct to the engine: {d:.0f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in direct)})")
        print(f"  batch via gateway:    {b:.0f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in batched)})")
        ratios = [y / x for x, y in zip(direct, batched, strict=True)]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"  batch / direct: {statistics.median(ratios):.2f} (median of the rounds' ratios: {each})")


async def ttfts(url: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for i in range(n):
            body = {**completion_body(i, 8), "stream": True}
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as r:
                async for _ in r.content.iter_any():
                    out.append(time.perf_counter() - start)
                    break
                async for _ in r.content.iter_any():
                    pass
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def ttft(tmp: Path, engine: Proc, args: argparse.Namespace) -> None:
    print(
        f"\nttft: interactive streams ({args.ttft_requests} one at a time, 8 tokens) idle vs during a 2,000-line batch"
    )
    print(
        f"  {'batch in flight':>15} {'idle p50':>9} {'busy p50':>9} {'ratio':>6} {'idle p90':>9} {'busy p90':>9} {'batch lines/s':>13}"
    )
    for concurrency in args.ttft_concurrency:
        batch_cfg = {"concurrency": concurrency, "claim_size": 8, "cancel_grace": 1}
        with gateway_for(tmp, engine.url, MODEL, batch_cfg, f"gw-ttft-{concurrency}", args.store_url) as gw:
            client = httpx.Client(base_url=gw.url, timeout=600)
            asyncio.run(ttfts(gw.url, 3))  # warm-up
            idle = asyncio.run(ttfts(gw.url, args.ttft_requests // 2))  # half before the batch, half after
            created = submit(client, batch_file(2000, args.tokens))
            while client.get(f"/v1/batches/{created['id']}").json()["request_counts"]["completed"] < concurrency:
                time.sleep(0.1)
            before = client.get(f"/v1/batches/{created['id']}").json()["request_counts"]["completed"]
            start = time.perf_counter()
            busy = asyncio.run(ttfts(gw.url, args.ttft_requests))
            rate = (client.get(f"/v1/batches/{created['id']}").json()["request_counts"]["completed"] - before) / (
                time.perf_counter() - start
            )
            client.post(f"/v1/batches/{created['id']}/cancel")
            wait(client, created["id"])
            idle += asyncio.run(ttfts(gw.url, args.ttft_requests - args.ttft_requests // 2))
            i50, b50 = pct(idle, 0.5), pct(busy, 0.5)
            print(
                f"  {concurrency:>15} {i50:>8.1f}ms {b50:>8.1f}ms {b50 / i50:>5.2f}x {pct(idle, 0.9):>8.1f}ms"
                f" {pct(busy, 0.9):>8.1f}ms {rate:>13.1f}"
            )


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.phase_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak = max(self.peak, rss)
            self.phase_peak = max(self.phase_peak, rss)
            time.sleep(0.05)

    def phase(self) -> float:
        """The peak since the last call (now included), in MiB."""
        peak, self.phase_peak = max(self.phase_peak, self.process.memory_info().rss), 0
        return peak / 2**20

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory(tmp: Path, args: argparse.Namespace) -> None:
    fake = fake_upstream(tmp, "--model", "fake", "--chunks", "8", name="fake-memory").start().wait_healthy()
    n = args.memory_lines
    source = tmp / "memory.jsonl"
    source.write_bytes(batch_file(n, 8, model="fake"))
    batch_cfg = {"concurrency": 64, "claim_size": 32, "max_lines": n}
    try:
        with gateway_for(tmp, fake.url, "fake", batch_cfg, "gw-memory", args.store_url) as gw:
            assert gw.proc is not None
            client = httpx.Client(base_url=gw.url, timeout=600)
            client.get("/v1/files")  # the store and the routes warmed up
            with RssSampler(gw.proc.pid) as rss:
                time.sleep(0.3)
                phases: list[tuple[str, float, float]] = [("idle", rss.phase(), 0.0)]
                start = time.perf_counter()
                with source.open("rb") as f:
                    uploaded = client.post(
                        "/v1/files", data={"purpose": "batch"}, files={"file": ("m.jsonl", f)}
                    ).json()
                phases.append(("upload", rss.phase(), time.perf_counter() - start))
                start = time.perf_counter()
                body = {"input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
                created = client.post("/v1/batches", json=body).json()
                phases.append(("validate + store lines", rss.phase(), time.perf_counter() - start))
                start = time.perf_counter()
                wait(client, created["id"], until=("finalizing", *FINAL), poll=0.5)
                phases.append(("run", rss.phase(), time.perf_counter() - start))
                run_s = phases[-1][2]
                start = time.perf_counter()
                done = wait(client, created["id"], poll=0.2)
                phases.append(("finalize", rss.phase(), time.perf_counter() - start))
                start = time.perf_counter()
                size = 0
                with client.stream("GET", f"/v1/files/{done['output_file_id']}/content") as r:
                    for chunk in r.iter_bytes():
                        size += len(chunk)
                phases.append(("download output", rss.phase(), time.perf_counter() - start))
            counts = done["request_counts"]
            print(
                f"\nmemory: {n} lines ({source.stat().st_size / 2**20:.1f} MiB in, {size / 2**20:.1f} MiB out), store {args.store_url}"
            )
            print(
                f"  status {done['status']}, {counts['completed']} completed, {counts['failed']} failed, {n / run_s:.0f} lines/s"
            )
            for name, peak, seconds in phases:
                print(f"  {name:<24} peak RSS {peak:7.1f} MiB  {seconds:7.1f} s")
            print(f"  overall peak {rss.peak / 2**20:.1f} MiB")
            if args.upload_mb:
                upload_only(tmp, client, gw, args.upload_mb)
    finally:
        fake.stop()


def upload_only(tmp: Path, client: httpx.Client, gw: Proc, megabytes: int) -> None:
    """A file of `megabytes` MiB uploaded and read back: the gateway's RSS stays flat."""
    assert gw.proc is not None
    big = tmp / "big.jsonl"
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "y" * 900}})
    with big.open("w") as f:
        for _ in range(megabytes * 2**20 // (len(line) + 1)):
            f.write(line + "\n")
    with RssSampler(gw.proc.pid) as rss:
        time.sleep(0.3)
        idle = rss.phase()
        start = time.perf_counter()
        with big.open("rb") as f:
            uploaded = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", f)}).json()
        up_s, up_peak = time.perf_counter() - start, rss.phase()
        start = time.perf_counter()
        size = 0
        with client.stream("GET", f"/v1/files/{uploaded['id']}/content") as r:
            for chunk in r.iter_bytes():
                size += len(chunk)
        down_s, down_peak = time.perf_counter() - start, rss.phase()
    assert size == big.stat().st_size == uploaded["bytes"]
    print(
        f"  upload {size / 2**20:.0f} MiB: idle {idle:.1f} MiB, peak {up_peak:.1f} MiB ({size / 2**20 / up_s:.0f} MiB/s);"
        f" download peak {down_peak:.1f} MiB ({size / 2**20 / down_s:.0f} MiB/s)"
    )
    client.delete(f"/v1/files/{uploaded['id']}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="throughput,ttft,memory")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lines", type=int, default=640)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="the engine's torch threads")
    p.add_argument("--ttft-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 4, 1])
    p.add_argument("--ttft-requests", type=int, default=40)
    p.add_argument("--memory-lines", type=int, default=100_000)
    p.add_argument("--upload-mb", type=int, default=200, help="then one upload this large (0: none)")
    p.add_argument("--store-url", default="sqlite:///bench.db")
    args = p.parse_args()
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "throughput" in sections or "ttft" in sections:
            engine = worker(tmp, "--model", str(TINY_MODEL), name="engine", threads=args.threads)
            engine.start().wait_healthy()
            try:
                if "throughput" in sections:
                    throughput(tmp, engine, args)
                if "ttft" in sections:
                    ttft(tmp, engine, args)
            finally:
                engine.stop()
        if "memory" in sections:
            memory(tmp, args)


if __name__ == "__main__":
    main()
