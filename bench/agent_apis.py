"""The cost of translating: CPU per request and per streamed chunk for `/v1/responses` and
`/v1/messages` against `/v1/chat/completions`, through one gateway in one run.

One gateway (auth off) in front of the fake upstream (testkit/fake_upstream.py), pinned apart
(--server-core, --client-core) as bench/request_path.py does. Each round runs the three APIs in a
rotating order: a closed loop of whole requests (CPU per request, the gateway's process), then
paced streams (the upstream's chunks --pace-ms apart; CPU per upstream chunk, the usage chunk
counted as one, so the three share a denominator). Responses requests send `store: false`: a
stored response adds one store write, which is the store's cost, not the translation's. Every
figure is the median over rounds; the differences and ratios are medians of each round's own.

    .venv/bin/python bench/agent_apis.py [--rounds 5] [--requests 3000] [--streams 100] [--chunks 64]

Targets: at most 0.05 ms more CPU per request than chat, at most 1.25x chat's CPU per chunk.

First it prints the translation's own cost in this process (no server, no network): parsing and
translating a request and its whole answer, against parsing a chat request, and translating one
streamed chunk; the least of 15 repetitions, which a busy machine disturbs least.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import servers
from bench.gateway_overhead import raise_nofile, run_async
from bench.servers import MODEL
from testkit.loadgen import closed_loop

APIS = ("chat", "responses", "messages")
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
# What a complete stream ends with, per API (the fake upstream stops on its token limit).
ENDS = {"chat": b"data: [DONE]", "responses": b'"type":"response.incomplete"', "messages": b"event: message_stop"}


def body(api: str, stream: bool) -> bytes:
    text = "hello"
    if api == "chat":
        b: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 32}
        if stream:
            b["stream_options"] = {"include_usage": True}  # the same chunks as the translations read
    elif api == "responses":
        b = {"model": MODEL, "input": text, "max_output_tokens": 32, "store": False}
    else:
        b = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 32}
    b["stream"] = stream
    return json.dumps(b).encode()


async def streams_run(url: str, payload: bytes, streams: int, end: bytes) -> tuple[int, float]:
    """`streams` streams at once, each read to its end; returns (complete streams, seconds)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    connector = aiohttp.TCPConnector(limit=streams)
    done = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal done
        async with session.post(url, data=payload) as r:
            data = await r.read()
        if r.status == 200 and end in data[-2000:]:
            done += 1

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session) for _ in range(streams)))
    return done, time.perf_counter() - start


def translation_cost() -> None:
    import orjson

    from gateway.apis.messages import MessagesTranslation
    from gateway.apis.messages_input import parse_messages
    from gateway.apis.responses import ResponsesTranslation
    from gateway.apis.responses_input import parse_responses
    from gateway.core.request import CHAT, parse_request

    message = {"role": "assistant", "content": "x " * 32}
    answer = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 32, "total_tokens": 40},
        }
    )
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","model":"fake","choices":[{"index":0,"delta":{"content":"x "},"finish_reason":null}]}\n\n'

    def chat() -> None:  # what the exchange does for a chat request: parse, then the engine body
        request = parse_request(body("chat", False), CHAT)
        orjson.dumps({**request.body, "model": MODEL})

    def responses() -> None:
        t = ResponsesTranslation(parse_responses(orjson.loads(body("responses", False))), [], 0)
        t.upstream(False, MODEL)
        t.whole(200, answer)

    def messages() -> None:
        t = MessagesTranslation(parse_messages(orjson.loads(body("messages", False))))
        t.upstream(False, MODEL)
        t.whole(200, answer)

    streamed_r = ResponsesTranslation(parse_responses(orjson.loads(body("responses", True))), [], 0)
    streamed_m = MessagesTranslation(parse_messages(orjson.loads(body("messages", True))))
    for t in (streamed_r, streamed_m):
        t.upstream(False, MODEL)
        t.open()

    def least(f: object, n: int) -> float:
        runs = []
        for _ in range(15):
            t0 = time.process_time()
            for _ in range(n):
                f()  # type: ignore[operator]
            runs.append((time.process_time() - t0) / n * 1e6)
        return min(runs)

    base = least(chat, 3000)
    extra_r, extra_m = least(responses, 3000) - base, least(messages, 3000) - base
    chunk_r, chunk_m = least(lambda: streamed_r.feed(chunk), 10000), least(lambda: streamed_m.feed(chunk), 10000)
    print(f"in-process (least of 15): parse a chat request {base:.1f} us;", end=" ")
    print(f"responses +{extra_r:.1f} us, messages +{extra_m:.1f} us per request;")
    print(f"  one streamed chunk: responses {chunk_r:.2f} us, messages {chunk_m:.2f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=3000, help="whole requests per API per round")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--streams", type=int, default=100, help="streams at once per API per round")
    p.add_argument("--chunks", type=int, default=64, help="content chunks per stream (and one usage chunk)")
    p.add_argument("--pace-ms", type=float, default=5.0)
    p.add_argument("--server-core", default="1")
    p.add_argument("--client-core", default="0")
    a = p.parse_args()
    translation_cost()
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="agent-apis-bench-"))
    whole_up = servers.start_upstream("fake", tmp, chunks=a.chunks, pace_ms=0, cpus=a.client_core)
    paced_up = servers.start_upstream("fake", tmp, chunks=a.chunks, pace_ms=a.pace_ms, cpus=a.client_core)
    whole_gw = servers.gateway(tmp, whole_up.json_url, a.server_core, name="gateway-whole").start()
    paced_gw = servers.gateway(tmp, paced_up.sse_url, a.server_core, name="gateway-paced").start()
    per_request: dict[str, list[float]] = {api: [] for api in APIS}
    per_chunk: dict[str, list[float]] = {api: [] for api in APIS}
    try:

        async def warm() -> None:
            for api in APIS:
                async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as s:
                    await closed_loop(s, whole_gw.url + PATHS[api], body(api, False), 4, requests=200, seconds=30)
                await streams_run(paced_gw.url + PATHS[api], body(api, True), 10, ENDS[api])

        run_async(warm)
        for round_ in range(a.rounds):
            order = APIS[round_ % 3 :] + APIS[: round_ % 3]
            for api in order:

                async def whole(api: str = api) -> int:
                    headers = {"content-type": "application/json"}
                    async with aiohttp.ClientSession(
                        headers=headers, connector=aiohttp.TCPConnector(limit=a.clients)
                    ) as s:
                        r = await closed_loop(
                            s, whole_gw.url + PATHS[api], body(api, False), a.clients, requests=a.requests, seconds=120
                        )
                    assert r.failures == 0, r.errors
                    return r.requests

                cpu0 = whole_gw.cpu()
                n = run_async(whole)
                per_request[api].append((whole_gw.cpu() - cpu0) / n * 1e3)

                async def streamed(api: str = api) -> tuple[int, float]:
                    return await streams_run(paced_gw.url + PATHS[api], body(api, True), a.streams, ENDS[api])

                cpu0 = paced_gw.cpu()
                done, _ = run_async(streamed)
                assert done == a.streams, f"{api}: {done} of {a.streams} streams complete"
                per_chunk[api].append((paced_gw.cpu() - cpu0) / (a.streams * (a.chunks + 1)) * 1e3)
            print(
                f"round {round_ + 1}: "
                + "  ".join(
                    f"{api} {per_request[api][-1]:.4f} ms/req {per_chunk[api][-1] * 1e3:.2f} us/chunk" for api in APIS
                ),
                flush=True,
            )
    finally:
        for server in (whole_gw, paced_gw):
            server.stop()
        whole_up.stop()
        paced_up.stop()
    print(f"\nmedians over {a.rounds} rounds (gateway CPU; {a.requests} whole requests, {a.clients} clients;")
    print(f"{a.streams} streams x {a.chunks + 1} chunks {a.pace_ms:g} ms apart):")
    for api in APIS:
        extra = statistics.median(r - c for r, c in zip(per_request[api], per_request["chat"], strict=True))
        ratio = statistics.median(r / c for r, c in zip(per_chunk[api], per_chunk["chat"], strict=True))
        print(
            f"  {api:10s} {statistics.median(per_request[api]):.4f} ms/request ({extra:+.4f} ms vs chat)"
            f"   {statistics.median(per_chunk[api]) * 1e3:.2f} us/chunk ({ratio:.2f}x chat)"
        )


if __name__ == "__main__":
    main()
