"""A very fast OpenAI-compatible fake engine, so that the gateway's own cost shows in benchmarks.

Pure ASGI (no framework), canned bodies built once. It also injects faults for tests:
`--fail-status 500` answers every completion with that status (health stays good).
`--delay-ms` is a service time for whole (non-streamed) answers; `--count` counts requests per
`user` field (`GET /counts` -> {user: n}), so a test can see how often the engine ran a request.

    python bench/fake_upstream.py --port 9000 [--chunks 32] [--pace-ms 0] [--fail-status 0]
                                  [--delay-ms 0] [--count]
"""

from __future__ import annotations

import argparse
import asyncio
import json

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


class FakeEngine:
    def __init__(
        self, model: str, chunks: int, pace_ms: float, fail_status: int, delay_ms: float = 0.0, count: bool = False
    ) -> None:
        self.chunks = chunks
        self.pace = pace_ms / 1000
        self.fail_status = fail_status
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
                return await _reply(send, 200, b"engine_num_requests_waiting 0\n", [(b"content-type", b"text/plain")])
            if path == "/counts" and self.counts is not None:
                return await _reply(send, 200, json.dumps(self.counts).encode())
            return await _reply(send, 404, b'{"error":{"message":"no route"}}')
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
        if b'"stream":true' in body or b'"stream": true' in body:
            await self._stream(send, b'"include_usage":true' in body or b'"include_usage": true' in body)
        else:
            if self.delay:
                await asyncio.sleep(self.delay)
            await _reply(send, 200, self.full)

    async def _stream(self, send: Send, usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        for chunk in self.stream_chunks:
            if self.pace:
                await asyncio.sleep(self.pace)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = (self.usage if usage else b"") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


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
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--count", action="store_true")
    args = p.parse_args()
    app = FakeEngine(args.model, args.chunks, args.pace_ms, args.fail_status, args.delay_ms, args.count)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
