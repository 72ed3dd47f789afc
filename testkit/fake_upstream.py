"""A very fast OpenAI-compatible fake engine, so that the gateway's own cost shows in benchmarks.

Pure ASGI (no framework), canned bodies built once. It also injects faults for tests:
`--fail-status 500` answers every completion with that status (health stays good).
`--delay-ms` is a service time for whole (non-streamed) answers; `--count` counts requests per
`user` field (`GET /counts` -> {user: n}), so a test can see how often the engine ran a request.
`--record-trace` keeps the `traceparent` and `tracestate` headers of each completion request
(`GET /traces` -> [{traceparent, tracestate}], oldest first), so a test sees the trace context
the gateway sent on.

With `--capacity N` (or `--service-ms M`) it behaves like a saturable engine instead: at most N
requests run at once, the rest wait in its own first-come queue; a running request holds its
slot `--service-ms` in all (its first chunk after `--first-token-ms`, the others evenly after
that), and a client that disconnects is aborted at once, as real engines do. It reports
`engine_num_requests_running`/`_waiting` on /metrics like the CPU worker, and `GET /stats`
gives the high-water marks (`max_running`, `max_waiting`) and the order in which requests got a
slot (their `user` field); `POST /stats/reset` zeroes them. `--service-spread F` draws each
request's service time uniformly within ±F of `--service-ms` (as outputs of different lengths
do), so the slots do not free all at once.

`--tools` also answers audio uploads (/v1/audio/*) with the model they named. It scripts tool use, to test the translations of the Responses and Messages APIs: a chat
request that offers tools and whose last message is not a tool's answer gets a call of its first
tool with `{"query": <the last user text>}` (finish reason tool_calls); one whose last message is
a tool's answer gets the text `tool said: <that answer>`. Streams split the arguments in pieces.

With `--enable-lora` it speaks vLLM's adapter API as scripted behaviour: `POST
/v1/load_lora_adapter {lora_name, lora_path}` and `POST /v1/unload_lora_adapter {lora_name}`
with vLLM's errors (400 both fields required, 400 already loaded, 404 not found), `--max-loras N`
enforced (a load past it is refused with 400 and counted), `--lora-modules name=path` loaded at
start, `--load-ms` a load's duration; adapters are listed in `/v1/models` with `parent`; a
request whose `model` names no loaded adapter (nor the base model) gets vLLM's 404; an answer
from an adapter starts with `[name]`, so a test can tell which adapter answered. `GET
/lora_stats` counts loads and unloads per adapter, refused loads, the most loaded at once, and
unloads of an adapter while one of its requests ran (`unloaded_in_use`).

    python testkit/fake_upstream.py --port 9000 [--chunks 32] [--pace-ms 0] [--fail-status 0]
                                  [--capacity 0] [--service-ms 0] [--first-token-ms -1]
                                  [--service-spread 0] [--delay-ms 0] [--count] [--record-trace] [--tools]
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


class Loras:
    """vLLM's runtime adapter API, scripted (see the module docstring)."""

    def __init__(self, base: str, max_loras: int, modules: list[str], load_ms: float) -> None:
        self.base = base
        self.max_loras = max_loras
        self.load = load_ms / 1000
        self.loaded: dict[str, str] = dict(m.split("=", 1) for m in modules)
        self.running: dict[str, int] = {}
        self.stats: dict[str, object] = {
            "loads": {},
            "unloads": {},
            "refused": 0,
            "duplicates": 0,
            "unloaded_in_use": 0,
            "most_loaded": 0,
        }

    def _count(self, kind: str, name: str) -> None:
        counts = self.stats[kind]
        assert isinstance(counts, dict)
        counts[name] = counts.get(name, 0) + 1

    async def load_adapter(self, body: bytes) -> tuple[int, bytes]:
        request = _json_or_empty(body)
        name, path = request.get("lora_name"), request.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            return 400, _vllm_error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name == self.base:
            return 400, _vllm_error(
                f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400
            )
        if name in self.loaded:
            self.stats["duplicates"] = int(str(self.stats["duplicates"])) + 1
            return 400, _vllm_error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
        if len(self.loaded) >= self.max_loras:
            self.stats["refused"] = int(str(self.stats["refused"])) + 1
            return 400, _vllm_error(
                f"max_loras ({self.max_loras}) adapters are loaded already.", "InvalidUserInput", 400
            )
        self.loaded[name] = "loading"  # a second load while this one runs is refused as vLLM's lock would
        await asyncio.sleep(self.load)
        self.loaded[name] = path
        self._count("loads", name)
        self.stats["most_loaded"] = max(int(str(self.stats["most_loaded"])), len(self.loaded))
        return 200, f"Success: LoRA adapter '{name}' added successfully.".encode()

    def unload_adapter(self, body: bytes) -> tuple[int, bytes]:
        name = _json_or_empty(body).get("lora_name")
        if not name:
            return 400, _vllm_error(
                "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400
            )
        if name not in self.loaded:
            return 404, _vllm_error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        if self.running.get(name):
            self.stats["unloaded_in_use"] = int(str(self.stats["unloaded_in_use"])) + 1
        del self.loaded[name]
        self._count("unloads", name)
        return 200, f"Success: LoRA adapter '{name}' removed successfully.".encode()

    def models(self) -> bytes:
        cards = [{"id": self.base, "object": "model", "root": self.base, "parent": None}]
        cards += [{"id": n, "object": "model", "root": p, "parent": self.base} for n, p in self.loaded.items()]
        return json.dumps({"object": "list", "data": cards}).encode()


def _json_or_empty(body: bytes) -> dict[str, object]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _vllm_error(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


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
        record_trace: bool = False,
        tools: bool = False,
        loras: Loras | None = None,
    ) -> None:
        self.tools = tools
        self.loras = loras
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
        self.traces: list[dict[str, str | None]] | None = [] if record_trace else None
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
                return await _reply(send, 200, self.loras.models() if self.loras else self.models)
            if path == "/lora_stats" and self.loras is not None:
                stats = {**self.loras.stats, "loaded": sorted(self.loras.loaded)}
                return await _reply(send, 200, json.dumps(stats).encode())
            if path == "/metrics":
                slots = self.slots
                text = f"engine_num_requests_running {slots.running}\nengine_num_requests_waiting {len(slots.queue)}\n"
                return await _reply(send, 200, text.encode(), [(b"content-type", b"text/plain")])
            if path == "/stats":
                return await _reply(send, 200, json.dumps(self.slots.stats()).encode())
            if path == "/counts" and self.counts is not None:
                return await _reply(send, 200, json.dumps(self.counts).encode())
            if path == "/traces" and self.traces is not None:
                return await _reply(send, 200, json.dumps(self.traces).encode())
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
        if self.traces is not None:
            headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in (b"traceparent", b"tracestate")}
            self.traces.append({"traceparent": headers.get("traceparent"), "tracestate": headers.get("tracestate")})
        if self.loras is not None:
            return await self._lora_route(path, body, send)
        if self.counts is not None:
            user = str(json.loads(body).get("user"))
            self.counts[user] = self.counts.get(user, 0) + 1
        if self.fail_status:
            return await _reply(send, self.fail_status, b'{"error":{"message":"injected fault","type":"server_error"}}')
        # A cheap look for "stream":true, as the canned answers need no real parsing.
        stream = b'"stream":true' in body or b'"stream": true' in body
        usage = b'"include_usage":true' in body or b'"include_usage": true' in body
        if self.tools and path.startswith("/v1/audio/"):
            return await _transcribed(send, body)
        if self.tools:
            return await _scripted(send, json.loads(body), stream)
        if self.saturable:
            await self._saturable(receive, send, body, stream, usage)
        elif stream:
            await self._stream(send, usage)
        else:
            if self.delay:
                await asyncio.sleep(self.delay)
            await _reply(send, 200, self.full)

    async def _lora_route(self, path: str, body: bytes, send: Send) -> None:
        """Adapter mode: the adapter API, and answers tagged with the adapter that gave them."""
        loras = self.loras
        assert loras is not None
        if path == "/v1/load_lora_adapter":
            status, reply = await loras.load_adapter(body)
            return await _reply(send, status, reply, JSON if status != 200 else [(b"content-type", b"text/plain")])
        if path == "/v1/unload_lora_adapter":
            status, reply = loras.unload_adapter(body)
            return await _reply(send, status, reply, JSON if status != 200 else [(b"content-type", b"text/plain")])
        request = _json_or_empty(body)
        model = str(request.get("model"))
        if model != loras.base and loras.loaded.get(model) in (None, "loading"):
            return await _reply(send, 404, _vllm_error(f"The model `{model}` does not exist.", "NotFoundError", 404))
        loras.running[model] = loras.running.get(model, 0) + 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            tag = f"[{model}] " if model != loras.base else ""
            answer = json.loads(_completion(model, self.chunks))
            answer["choices"][0]["message"]["content"] = tag + answer["choices"][0]["message"]["content"]
            if request.get("stream"):
                await send({"type": "http.response.start", "status": 200, "headers": SSE})
                first = _chunk(model, tag, None)
                rest = b"".join(self.stream_chunks).replace(
                    b'"model":' + json.dumps(loras.base, separators=(",", ":")).encode(),
                    b'"model":' + json.dumps(model).encode(),
                )
                options = request.get("stream_options")
                usage = self.usage if isinstance(options, dict) and options.get("include_usage") else b""
                await send({"type": "http.response.body", "body": first + rest + usage + b"data: [DONE]\n\n"})
            else:
                await _reply(send, 200, json.dumps(answer).encode())
        finally:
            loras.running[model] -= 1

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


def _text_of(content: object) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


END = b"\r\n--"


async def _transcribed(send: Send, body: bytes) -> None:
    """--tools: an audio upload answered with the model it named and the size of its file."""
    model = body.split(b'name="model"\r\n\r\n', 1)[-1].split(b"\r\n", 1)[0].decode(errors="replace")
    file = body.split(b'name="file"', 1)[-1].split(b"\r\n\r\n", 1)[-1]
    answer = {
        "text": f"model={model} bytes={len(file.rsplit(END, 1)[0])}",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    await _reply(send, 200, json.dumps(answer).encode())


async def _scripted(send: Send, body: dict[str, object], stream: bool) -> None:
    """--tools: a tool call when tools are offered, the tool's answer echoed once it came back."""
    messages = body.get("messages") or []
    assert isinstance(messages, list)
    last = messages[-1] if messages else {}
    tools = body.get("tools") or []
    assert isinstance(tools, list)
    model = str(body.get("model"))
    call = None
    if tools and last.get("role") != "tool":
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        name = tools[0]["function"]["name"]
        call = {"id": "call_fake1", "name": name, "arguments": json.dumps({"query": user})}
        text, finish = "", "tool_calls"
    else:
        text, finish = "tool said: " + _text_of(last.get("content")) if last.get("role") == "tool" else "hello", "stop"
    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    if not stream:
        message: dict[str, object] = {"role": "assistant", "content": text or None}
        if call:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ]
        answer = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        return await _reply(send, 200, json.dumps(answer).encode())
    deltas: list[dict[str, object]] = [{"role": "assistant", "content": ""}]
    if call:
        args = call["arguments"]
        half = len(args) // 2
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": ""},
                    }
                ]
            }
        )
        deltas += [
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in (args[:half], args[half:])
        ]
    else:
        words = text.split(" ")
        deltas += [{"content": w + (" " if i < len(words) - 1 else "")} for i, w in enumerate(words)]
    await send({"type": "http.response.start", "status": 200, "headers": SSE})
    for i, delta in enumerate(deltas):
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish if i == len(deltas) - 1 else None}],
        }
        await send(
            {"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n", "more_body": True}
        )
    tail = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
    end = b"data: " + json.dumps(tail).encode() + b"\n\ndata: [DONE]\n\n"
    await send({"type": "http.response.body", "body": end, "more_body": False})


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
    p.add_argument("--record-trace", action="store_true", help="keep each request's traceparent (GET /traces)")
    p.add_argument("--tools", action="store_true", help="scripted tool calls (see the module's docstring)")
    p.add_argument("--enable-lora", action="store_true", help="speak vLLM's adapter API (see the docstring)")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--lora-modules", nargs="*", default=[], help="name=path adapters loaded at start")
    p.add_argument("--load-ms", type=float, default=0.0, help="how long loading an adapter takes")
    args = p.parse_args()
    loras = Loras(args.model, args.max_loras, args.lora_modules, args.load_ms) if args.enable_lora else None
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
        args.record_trace,
        args.tools,
        loras,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
