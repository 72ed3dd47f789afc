"""A small streaming load generator shared by the engine benchmarks (aiohttp, cheap per chunk)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class StreamResult:
    ttft: float  # seconds to the first content chunk
    tokens: int  # completion tokens, from the final usage chunk


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> StreamResult:
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with session.post(url + "/v1/completions", json=payload) as r:
        r.raise_for_status()
        buf = b""
        async for data in r.content.iter_any():
            if not ttft:
                ttft = time.perf_counter() - start
            buf += data
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if b'"usage":{' in event:
                    tokens = int(json.loads(event[6:])["usage"]["completion_tokens"])
    return StreamResult(ttft, tokens)


@dataclass(frozen=True)
class LevelResult:
    clients: int
    tokens_per_s: float
    ttft_ms: float  # median over the level's requests


async def run_level(url: str, clients: int, requests_per_client: int, body: dict[str, object]) -> LevelResult:
    """`clients` concurrent streams, each sending `requests_per_client` requests back to back."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client(i: int) -> list[StreamResult]:
            out = []
            for j in range(requests_per_client):
                out.append(await stream_completion(session, url, {**body, "prompt": f"{body['prompt']} {i} {j}"}))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        elapsed = time.perf_counter() - start
    return LevelResult(
        clients, sum(r.tokens for r in results) / elapsed, statistics.median(r.ttft for r in results) * 1e3
    )
