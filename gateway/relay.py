"""Upstream HTTP client and the SSE relay.

Streams are relayed chunk by chunk as they arrive, as raw bytes: the relay only cuts at SSE event
boundaries and parses the one event that carries the final usage. The client's pace drives the
reads (a send must finish before the next upstream read), so a slow client holds back its own
upstream through TCP flow control instead of growing the gateway's memory; a client that reads
nothing for `send_timeout` is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.settings import ServerSettings

_DONE = b"data: [DONE]"
_JSON_HEADERS = {"content-type": "application/json"}
_STALE_RETRIES = 2
_USAGE = b'"usage":{'


@dataclass(slots=True)
class StreamStats:
    """What the relay saw; read by accounting when the stream ends."""

    started: float = field(default_factory=time.perf_counter)
    first_chunk: float = 0.0
    last_chunk: float = 0.0
    chunks: int = 0
    on_gap: Callable[[float], None] | None = None  # inter-chunk latency, observed as it happens
    usage: dict[str, Any] | None = None
    done: bool = False  # the upstream finished the stream with [DONE]
    disconnected: bool = False  # the client went away first
    error: str | None = None  # why the upstream stream broke, if it did


class Upstream:
    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self._session: aiohttp.ClientSession | None = None
        # Built once: per-request construction shows up in profiles.
        self._auth_headers: dict[str, dict[str, str]] = {}
        s = server
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=s.connect_timeout, sock_read=s.idle_timeout)
        self._whole_timeout = aiohttp.ClientTimeout(total=None, connect=s.connect_timeout, sock_read=s.request_timeout)

    async def start(self) -> None:
        # Idle connections are dropped before the engines drop them (uvicorn and vLLM: 5 s), so a
        # request rarely picks up one the engine is closing; `post` retries the rare one that does.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def post(self, url: str, body: bytes, api_key: str | None, stream: bool) -> aiohttp.ClientResponse:
        """Sends the request and returns once the response headers are in.

        Raises aiohttp.ClientError / OSError when the engine cannot be reached, TimeoutError when
        it does not answer in time.
        """
        assert self._session is not None
        headers = _JSON_HEADERS
        if api_key:
            headers = self._auth_headers.get(api_key) or {**_JSON_HEADERS, "authorization": f"Bearer {api_key}"}
            self._auth_headers[api_key] = headers
        timeout = self._stream_timeout if stream else self._whole_timeout
        async with asyncio.timeout(self._server.first_byte_timeout if stream else self._server.request_timeout):
            for attempt in range(_STALE_RETRIES + 1):
                try:
                    return await self._session.post(url, data=body, headers=headers, timeout=timeout)
                except aiohttp.ClientConnectorError:
                    raise  # nothing listens there: the engine is down
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # A pooled keep-alive connection the engine closed meanwhile: nothing was
                    # processed, so the same engine is tried again on another connection.
                    if attempt == _STALE_RETRIES:
                        raise
        raise AssertionError("unreachable")

    async def read_all(self, response: aiohttp.ClientResponse) -> bytes:
        async with asyncio.timeout(self._server.request_timeout):
            return await response.read()


def _event_end(buf: bytes) -> int:
    """Index just past the last complete SSE event in buf (0 when there is none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def take_usage(block: bytes, stats: StreamStats, strip: bool) -> bytes:
    """Records the usage event's figures; drops that event when the client did not ask for it."""
    events = block.split(b"\n\n")
    kept = []
    for event in events:
        if _USAGE in event and event.startswith(b"data: "):
            try:
                payload = orjson.loads(event[6:])
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                stats.usage = payload["usage"]
                if strip and not payload.get("choices"):
                    continue
        kept.append(event)
    return b"\n\n".join(kept)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SendWatchdog:
    """One sweeper for every open stream drops the clients that stopped reading; cheaper than an
    asyncio.timeout around each relayed chunk."""

    def __init__(self, interval: float = 1.0) -> None:
        self._relays: set[StreamRelay] = set()
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def watch(self, relay: StreamRelay) -> None:
        self._relays.add(relay)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sweep(), name="send-watchdog")

    def unwatch(self, relay: StreamRelay) -> None:
        self._relays.discard(relay)

    async def _sweep(self) -> None:
        while self._relays:
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            for relay in [r for r in self._relays if r.stalled(now)]:
                relay.drop()


_watchdog = _SendWatchdog()


class StreamRelay:
    """An ASGI response that relays an upstream SSE stream."""

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
        *,
        strip_usage: bool,
        send_timeout: float,
        stats: StreamStats,
    ) -> None:
        self._upstream = upstream
        self.headers = headers
        self._strip = strip_usage
        self.send_timeout = send_timeout
        self.stats = stats
        self.sending_since = 0.0  # monotonic time the current send began, 0 when none is pending
        self._pump_task: asyncio.Future[None] | None = None

    def stalled(self, now: float) -> bool:
        return bool(self.sending_since) and now - self.sending_since > self.send_timeout

    def drop(self) -> None:
        """The client has read nothing for send_timeout: give up on it (its upstream is closed)."""
        self.stats.disconnected = True
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        self._pump_task = pump
        _watchdog.watch(self)
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            _watchdog.unwatch(self)
            # Whoever is still running is not needed any more; closing the upstream response drops
            # its connection, which is what makes the engine abort the request.
            if not pump.done():
                self.stats.disconnected = True
                pump.cancel()
            watcher.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            self._upstream.close()
        if pump.done() and not pump.cancelled() and (exc := pump.exception()) is not None:
            if not isinstance(exc, (OSError, TimeoutError)):
                raise exc
            self.stats.disconnected = True

    async def _send(self, send: Send, message: Message) -> None:
        # A timestamp, not an asyncio.timeout per chunk: the send watchdog sweeps all streams.
        self.sending_since = time.monotonic()
        await send(message)
        self.sending_since = 0.0

    async def _pump(self, send: Send) -> None:
        stats = self.stats
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        content = self._upstream.content
        buf = b""
        try:
            while True:
                data = await content.readany()
                if not data:
                    break
                now = time.perf_counter()
                if stats.chunks:
                    if stats.on_gap is not None:
                        stats.on_gap(now - stats.last_chunk)
                else:
                    stats.first_chunk = now
                stats.last_chunk = now
                stats.chunks += 1
                buf = buf + data if buf else data
                end = _event_end(buf)
                if not end:
                    continue
                block, buf = buf[:end], buf[end:]
                if _USAGE in block:
                    block = take_usage(block, stats, self._strip)
                if _DONE in block:
                    stats.done = True
                if block:
                    await self._send(send, {"type": "http.response.body", "body": block, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not stats.done:
            # The engine died or stalled mid-stream: tell the client in-band, then end cleanly.
            stats.error = stats.error or "the engine closed the stream before it finished"
            error = GatewayError(502, f"The upstream engine failed mid-stream ({stats.error}).", code="upstream_error")
            await self._send(send, {"type": "http.response.body", "body": error.sse(), "more_body": True})
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
