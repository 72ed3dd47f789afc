"""Load generators shared by the benchmarks (aiohttp, cheap per chunk): engine streams, and for the proxy
benchmarks a closed loop of whole answers and many paced streams held at once."""

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


# ----------------------------------------------------------------------------------------------------------------
# Proxy benchmarks (bench/request_path.py): a closed loop of whole answers, and many paced streams held at once.
# The caller owns the session (its connector limit is the concurrency), so a warm-up on the same session leaves
# the connections open for the measured run.


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def failure(status: int, body: bytes) -> str:
    """`status 503 quota_unavailable`: the status and the OpenAI error code (or type) of a failed answer."""
    try:
        error = json.loads(body)["error"]
        return f"status {status} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"status {status}"


@dataclass(frozen=True)
class ClosedLoopResult:
    requests: int  # answered, failures included
    failures: int
    errors: dict[str, int]  # why, how many
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def closed_loop(
    session: aiohttp.ClientSession, url: str, body: bytes, clients: int, *, requests: int, seconds: float
) -> ClosedLoopResult:
    """`clients` loops posting `body` and reading the whole answer, until `requests` in all or `seconds` pass."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    left = requests
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body) as r:
                    data = await r.read()
                    why = "" if r.status == 200 else failure(r.status, data)
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
            latencies.append(time.perf_counter() - t0)
            if why:
                errors[why] = errors.get(why, 0) + 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return ClosedLoopResult(
        requests=len(latencies),
        failures=sum(errors.values()),
        errors=errors,
        seconds=time.perf_counter() - start,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
    )


class Failed(Exception):
    """A stream answered with an error status."""


CONTENT_EVENT = b"data: {"  # every chunk (usage included) starts so; [DONE] does not
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class PacedResult:
    streams: int
    completed: int  # status 200, every chunk, and [DONE]
    errors: dict[str, int]  # why the others did not
    held_at_once: int  # the most streams open at the same time
    chunks: int  # chunks received, over all streams
    seconds: float
    gap_p50_ms: float  # between two chunks of one stream, as the client sees them
    gap_p99_ms: float


async def paced_streams(
    session: aiohttp.ClientSession, url: str, body: bytes, streams: int, *, chunks: int, ramp_s: float
) -> PacedResult:
    """`streams` streaming requests started evenly over `ramp_s`, each read to its end; `chunks` are expected
    per stream (the usage chunk included)."""
    gaps: list[float] = []
    errors: dict[str, int] = {}
    open_now = held = completed = received = 0

    async def one(i: int) -> None:
        nonlocal open_now, held, completed, received
        await asyncio.sleep(i * ramp_s / streams)
        count = 0
        last = 0.0
        # One byte less than the marker is carried over, so an event split over two reads is counted once and
        # none twice; the last 16 bytes show whether the stream ended with [DONE].
        tail = end = b""
        why = ""
        try:
            async with session.post(url, data=body) as r:
                if r.status != 200:
                    raise Failed(failure(r.status, await r.read()))
                open_now += 1
                held = max(held, open_now)
                try:
                    async for data in r.content.iter_any():
                        joined = tail + data
                        n = joined.count(CONTENT_EVENT)
                        if n:
                            now = time.perf_counter()
                            if last:
                                gaps.append(now - last)
                            gaps.extend([0.0] * (n - 1))  # chunks that came in one read
                            last = now
                            count += n
                        tail = joined[1 - len(CONTENT_EVENT) :]
                        end = (end + data)[-len(DONE) :]
                finally:
                    open_now -= 1
                if count != chunks:
                    why = f"{count} of {chunks} chunks"
                elif end != DONE:
                    why = "no [DONE]"
        except Failed as exc:
            why = str(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = type(exc).__name__
        received += count
        if why:
            errors[why] = errors.get(why, 0) + 1
        else:
            completed += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    return PacedResult(
        streams=streams,
        completed=completed,
        errors=errors,
        held_at_once=held,
        chunks=received,
        seconds=time.perf_counter() - start,
        gap_p50_ms=percentile(gaps, 50) * 1e3,
        gap_p99_ms=percentile(gaps, 99) * 1e3,
    )
