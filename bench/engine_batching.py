"""Continuous batching vs sequential generation, side by side in one run.

Starts a real engine worker with the tiny model, measures aggregate generated tokens/s and time to
first token at 1, 4 and 16 concurrent streaming clients, then generates the same prompts one after
another with `model.generate` in this process, and prints the ratios.

    .venv/bin/python bench/engine_batching.py [--tokens 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.loadgen import run_level
from testkit.procs import TINY_MODEL, worker

MODEL = "tiny-llama"


def prompts(count: int) -> list[str]:
    subjects = ["The license", "A function", "Python", "The software", "Permission", "The module"]
    return [f"{subjects[i % len(subjects)]} number {i} is" for i in range(count)]


async def concurrent_run(url: str, clients: int, tokens: int) -> tuple[float, float]:
    """Returns (aggregate tokens/s, median TTFT in ms) for `clients` streams started together."""
    body = {"model": MODEL, "prompt": "The license", "max_tokens": tokens, "ignore_eos": True}
    result = await run_level(url, clients, 1, body)
    return result.tokens_per_s, result.ttft_ms


def sequential_generate(count: int, tokens: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    texts = prompts(count)
    model.generate(**tok(texts[0], return_tensors="pt"), max_new_tokens=4, do_sample=True)  # warm-up
    start = time.perf_counter()
    generated = 0
    with torch.inference_mode():
        for text in texts:
            inputs = tok(text, return_tensors="pt")
            out = model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, pad_token_id=tok.pad_token_id
            )
            generated += out.shape[1] - inputs["input_ids"].shape[1]
    return generated / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    levels = (1, 4, 16)
    tps: dict[int, list[float]] = {n: [] for n in levels}
    ttft: dict[int, list[float]] = {n: [] for n in levels}
    with tempfile.TemporaryDirectory() as tmp:
        proc = worker(Path(tmp), "--model", str(TINY_MODEL), name="bench", threads=args.threads)
        proc.start().wait_healthy()
        try:
            asyncio.run(concurrent_run(proc.url, 4, 8))  # warm-up
            for _ in range(args.rounds):
                for n in levels:
                    rate, first = asyncio.run(concurrent_run(proc.url, n, args.tokens))
                    tps[n].append(rate)
                    ttft[n].append(first)
        finally:
            proc.stop()
    seq = [sequential_generate(16, args.tokens, args.threads) for _ in range(args.rounds)]

    med = {n: statistics.median(v) for n, v in tps.items()}
    seq_med = statistics.median(seq)
    print(f"tiny model, {args.tokens} new tokens per request, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'clients':>8} {'tokens/s':>10} {'TTFT ms':>9} {'vs 1 client':>12} {'vs sequential':>14}")
    for n in levels:
        print(
            f"{n:>8} {med[n]:>10.0f} {statistics.median(ttft[n]):>9.1f} {med[n] / med[1]:>11.2f}x"
            f" {med[n] / seq_med:>13.2f}x"
        )
    print(f"{'seq gen':>8} {seq_med:>10.0f} {'':>9} {seq_med / med[1]:>11.2f}x {1.0:>13.2f}x")


if __name__ == "__main__":
    main()
