"""A very fast OpenAI-compatible fake engine, so that the gateway's own cost shows in benchmarks.

Pure ASGI (no framework), canned bodies built once. It also injects faults for tests:
`--fail-status 500` answers every completion with that status (health stays good).
`--delay-ms` is a service time for whole (non-streamed) answers; `--count` counts requests per
`user` field (`GET /counts` -> {user: n}), so a test can see how often the engine ran a request.

With `--capacity N` (or `--service-ms M`) it behaves like a saturable engine instead: at most N
requests run at once, the rest wait in its own first-come queue; a running request holds its
slot `--service-ms` in all (its first chunk after `--first-token-ms`, the others evenly after
that), and a client that disconnects is aborted at once, as real engines do. It reports
`engine_num_requests_running`/`_waiting` on /metrics like the CPU worker, and `GET /stats`
gives the high-water marks (`max_running`, `max_waiting`) and the order in which requests got a
slot (their `user` field); `POST /stats/reset` zeroes them. `--service-spread F` draws each
request's service time uniformly within ±F of `--service-ms` (as outputs of different lengths
do), so the slots do not free all at once.

    python testkit/fake_upstream.py --port 9000 [--chunks 32] [--pace-ms 0] [--fail-status 0]
                                  [--capacity 0] [--service-ms 0] [--first-token-ms -1]
                                  [--service-spread 0] [--delay-ms 0] [--count]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
from collections import deque

from starlette.types import Receive, Scope, Send

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _completion(model: str, tokens: int) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x " * tokens}, "finish_reason": "length"}
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        },
        separators=(",", ":"),
    ).encode()


def _chunk(model: str, text: str, finish: str | None) -> bytes:
    body = {
        "id": "cmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _usage_chunk(model: str, tokens: int) -> bytes:
    body = {
        "id": "cmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class Slots:
    """At most `capacity` running (0: no limit); the rest wait first come, first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.queue: deque[asyncio.Future[None]] = deque()
        self.reset()

    def reset(self) -> None:
        self.max_running = self.running
        self.max_waiting = len(self.queue)
        self.served = 0
        self.order: deque[str] = deque(maxlen=10_000)  # the `user` of each request given a slot

    async def acquire(self, tag: str) -> None:
        if self.capacity and (self.running >= self.capacity or self.queue):
            waiter = asyncio.get_running_loop().create_future()
            self.queue.append(waiter)
            self.max_waiting = max(self.max_waiting, len(self.queue))
            try:
                await waiter  # the releaser hands its slot over: `running` stays as it is
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.release()
                else:
                    self.queue.remove(waiter)
                raise
        else:
            self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.served += 1
        self.order.append(tag)

    def release(self) -> None:
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def stats(self) -> dict[str, object]:
        return {
            "capacity": self.capacity,
            "running": self.running,
            "waiting": len(self.queue),
            "max_running": self.max_running,
            "max_waiting": self.max_waiting,
            "served": self.served,
            "order": list(self.order),
        }


class FakeEngine:
    def __init__(
        self,
        model: str,
        chunks: int,
        pace_ms: float,
        fail_status: int,
        capacity: int = 0,
        service_ms: float = 0.0,
        first_token_ms: float = -1.0,
        service_spread: float = 0.0,
        delay_ms: float = 0.0,
        count: bool = False,
    ) -> None:
        self.chunks = chunks
        self.pace = pace_ms / 1000
        self.fail_status = fail_status
        self.saturable = bool(capacity or service_ms)
        self.slots = Slots(capacity)
        self.service = service_ms / 1000
        first = first_token_ms / 1000 if first_token_ms >= 0 else self.service / max(1, chunks)
        self.first_token = min(first, self.service)
        self.spread = service_spread
        self.rng = random.Random(0)
        self.delay = delay_ms / 1000
        self.counts: dict[str, int] | None = {} if count else None
        self.full = _completion(model, chunks)
        self.stream_chunks = [_chunk(model, "x ", None) for _ in range(chunks - 1)] + [_chunk(model, "x", "length")]
        self.usage = _usage_chunk(model, chunks)
        self.models = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET":
            if path == "/health":
                return await _reply(send, 200, b'{"status":"ok"}')
            if path == "/v1/models":
                return await _reply(send, 200, self.models)
            if path == "/metrics":
                slots = self.slots
                text = f"engine_num_requests_running {slots.running}\nengine_num_requests_waiting {len(slots.queue)}\n"
                return await _reply(send, 200, text.encode(), [(b"content-type", b"text/plain")])
            if path == "/stats":
                return await _reply(send, 200, json.dumps(self.slots.stats()).encode())
            if path == "/counts" and self.counts is not None:
                return await _reply(send, 200, json.dumps(self.counts).encode())
            return await _reply(send, 404, b'{"error":{"message":"no route"}}')
        if path == "/stats/reset":
            self.slots.reset()
            return await _reply(send, 200, b"{}")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.counts is not None:
            user = str(json.loads(body).get("user"))
            self.counts[user] = self.counts.get(user, 0) + 1
        if self.fail_status:
            return await _reply(send, self.fail_status, b'{"error":{"message":"injected fault","type":"server_error"}}')
        # A cheap look for "stream":true, as the canned answers need no real parsing.
        stream = b'"stream":true' in body or b'"stream": true' in body
        usage = b'"include_usage":true' in body or b'"include_usage": true' in body
        if self.saturable:
            await self._saturable(receive, send, body, stream, usage)
        elif stream:
            await self._stream(send, usage)
        else:
            if self.delay:
                await asyncio.sleep(self.delay)
            await _reply(send, 200, self.full)

    async def _saturable(self, receive: Receive, send: Send, body: bytes, stream: bool, usage: bool) -> None:
        """Like a real engine: waits for a slot, holds it for the service time, aborts when the
        client goes away."""
        try:
            tag = str(json.loads(body).get("user") or "")
        except (ValueError, AttributeError):
            tag = ""
        work = asyncio.ensure_future(self._serve(send, tag, stream, usage))
        gone = asyncio.ensure_future(_disconnect(receive))
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        for task in (work, gone):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if work.done() and not work.cancelled():
            work.result()

    async def _serve(self, send: Send, tag: str, stream: bool, usage: bool) -> None:
        slots = self.slots
        await slots.acquire(tag)
        held = True
        service = self.service * (1 + self.spread * self.rng.uniform(-1, 1))
        gap = max(0.0, service - self.first_token) / max(1, self.chunks - 1)
        try:
            if not stream:
                await asyncio.sleep(service)
                held = False
                slots.release()  # before the last bytes: the client may send its next at once
                return await _reply(send, 200, self.full)
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            await asyncio.sleep(self.first_token)
            last = len(self.stream_chunks) - 1
            for i, chunk in enumerate(self.stream_chunks):
                if i:
                    await asyncio.sleep(gap)
                if i == last:
                    tail = chunk + (self.usage if usage else b"") + b"data: [DONE]\n\n"
                    held = False
                    slots.release()
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            if held:
                slots.release()

    async def _stream(self, send: Send, usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        for chunk in self.stream_chunks:
            if self.pace:
                await asyncio.sleep(self.pace)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = (self.usage if usage else b"") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--pace-ms", type=float, default=0.0)
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--capacity", type=int, default=0, help="requests running at once (0: no limit)")
    p.add_argument("--service-ms", type=float, default=0.0, help="how long a running request holds its slot")
    p.add_argument("--first-token-ms", type=float, default=-1.0, help="first chunk after (default: evenly paced)")
    p.add_argument("--service-spread", type=float, default=0.0, help="service times vary by up to this fraction")
    p.add_argument("--delay-ms", type=float, default=0.0, help="service time of a whole (non-streamed) answer")
    p.add_argument("--count", action="store_true", help="count requests per `user` (GET /counts)")
    args = p.parse_args()
    app = FakeEngine(
        args.model,
        args.chunks,
        args.pace_ms,
        args.fail_status,
        args.capacity,
        args.service_ms,
        args.first_token_ms,
        args.service_spread,
        args.delay_ms,
        args.count,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
