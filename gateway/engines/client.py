"""The upstream HTTP client: HTTP/1.1 to the engines on asyncio protocols, responses parsed by httptools.

aiohttp's client request path was the largest share of the gateway's own CPU per request (the
thinnest aiohttp-based proxy is the benchmark's floor). Relaying to an engine needs much less than
a general client: one POST at a time per connection, keep-alive pools per engine, a body out with
Content-Length, a body in with Content-Length or chunked (httptools decodes both), and flow
control (a slow client pauses the reads from its engine). So this client does just that.

Timeouts are deadlines that one sweeper per client checks twice a second, not a timer per request
or per chunk: a response waits at most `first_byte_timeout` (streams) or `request_timeout` (whole
answers) for its headers, a whole answer `request_timeout` in all, and a stream `idle_timeout`
between two chunks. The body of a stream is handed over as what has arrived since the last read,
so a burst of chunks costs one wake-up of the relay, not one each.

Errors: EngineUnreachable (nothing was sent: the engine is down), UpstreamError (it failed after
the request was sent), TimeoutError. A pooled connection that the engine closed while it sat
idle fails before any byte of the answer: the request goes again on a new connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from gateway.engines.tls import engine_ssl
from gateway.settings import EngineSettings, ServerSettings

KEEPALIVE = 3.0  # idle connections are dropped before the engines drop theirs (uvicorn, vLLM: 5 s)
SWEEP_EVERY = 0.5
STALE_RETRIES = 2
HIGH_WATER = 256 * 1024  # bytes read ahead of the relay before the engine's socket is paused


class EngineUnreachable(Exception):
    """Nothing answered at the engine's address, or it closed the connection before a byte of an answer:
    it is down, or dying, or not serving yet. Safe to send the request elsewhere."""


class UpstreamError(Exception):
    """The engine failed after the request was sent: connection lost, a broken response."""


class _Stale(Exception):
    """A reused connection died before any byte of the answer: nothing was processed."""


class UpstreamResponse:
    """One answer: `status` and `headers` once `post` returns; the body by `read` or `chunk`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_client",
        "_conn",
        "_done",
        "_error",
        "_headers_in",
        "_paused",
        "_waiter",
        "deadline",
        "headers",
        "idle_timeout",
        "keep_alive",
        "started",
        "status",
    )

    def __init__(self, client: Upstream, conn: _Connection, deadline: float, idle_timeout: float) -> None:
        self._client = client
        self._conn = conn
        self.deadline = deadline  # loop time: when waiting any longer is a timeout
        self.idle_timeout = idle_timeout  # a stream's longest gap between chunks (0: whole answers)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.started = False  # a byte of the answer came
        self._headers_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunk(self) -> bytes:
        """What has arrived since the last call, waiting for some; b"" at the end."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self._buffered = 0
                if self._paused and not self._conn.closed:
                    self._paused = False
                    self._conn.transport.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def release(self) -> None:
        """Done with it: a whole, keep-alive connection goes back to the pool, any other closes."""
        self._client._finished(self)
        if self._done and self.keep_alive and self._error is None:
            self._client._idle(self._conn)
        else:
            self._conn.close()

    def close(self) -> None:
        """Drop the connection now (the engine sees the client go, and aborts the request); a
        read waiting on it ends with UpstreamError."""
        self._fail(UpstreamError("the gateway closed the connection"))
        self._client._finished(self)
        self._conn.close()

    # ---- called by the connection --------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_headers(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        if self.idle_timeout:
            self.deadline = self._conn.loop.time() + self.idle_timeout
        if not self._headers_in.done():
            self._headers_in.set_result(None)

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self.idle_timeout:
            self.deadline = self._conn.loop.time() + self.idle_timeout
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True  # the client is slower than the engine: let TCP hold the engine back
            self._conn.transport.pause_reading()
        self._wake()

    def _on_complete(self) -> None:
        self._done = True
        self.deadline = 0.0
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._error = error
        if not self._headers_in.done():
            self._headers_in.set_exception(error)
            self._headers_in.exception()  # retrieved: `post` may have stopped waiting already
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: _Engine) -> None:
        self.loop = loop
        self.target = target  # whose idle pool it goes back to
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.response is not None:
                self.response._fail(UpstreamError(f"a malformed answer from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is not None and not response._done:
            why = f"{type(exc).__name__}: {exc}" if exc else "the engine closed the connection"
            if self.reused and not response.started:
                response._fail(_Stale())
            elif not response.started:  # accepted, then closed without a byte: a dying or starting engine
                response._fail(EngineUnreachable(f"{why} before answering"))
            else:
                response._fail(UpstreamError(why))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.response is not None:
            self.response.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response._on_headers(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._on_body(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        if response is not None:
            response._on_complete()


class _Engine:
    """One engine's address, request head and idle connections."""

    __slots__ = ("auth", "heads", "host", "idle", "port", "ssl", "tls_name")

    def __init__(self, engine: EngineSettings) -> None:
        parts = urlsplit(engine.url)
        https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if https else 80)
        self.ssl: ssl.SSLContext | bool | None = engine_ssl(engine) if https else None
        self.tls_name = self.host if https else None
        host = parts.netloc.rpartition("@")[2]
        self.auth = f"authorization: Bearer {engine.api_key}\r\n".encode() if engine.api_key else b""
        self.heads: dict[str, bytes] = {}
        self.heads[""] = f"host: {host}\r\ncontent-type: application/json\r\n".encode()
        self.idle: list[_Connection] = []

    def request(self, path: str, body: bytes, extra: bytes = b"", content_type: bytes | None = None) -> list[bytes]:
        """`extra`: more header lines, each ending in CRLF; `content_type`: a body that is not JSON
        (a multipart upload), whose head is its own and not cached."""
        if content_type is not None:
            host = self.heads[""].split(b"\r\n", 1)[0]
            head = b"POST %s HTTP/1.1\r\n%s\r\ncontent-type: %s\r\n" % (path.encode(), host, content_type) + self.auth
            return [head, extra, b"content-length: %d\r\n\r\n" % len(body), body]
        cached = self.heads.get(path)
        if cached is None:
            cached = self.heads[path] = f"POST {path} HTTP/1.1\r\n".encode() + self.heads[""] + self.auth
        return [cached, extra, b"content-length: %d\r\n\r\n" % len(body), body]


class Upstream:
    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self._engines: dict[str, _Engine] = {}
        self._active: set[UpstreamResponse] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="upstream-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for engine in self._engines.values():
            for conn in engine.idle:
                conn.close()
            engine.idle.clear()
        for response in list(self._active):
            response.close()

    async def post(
        self,
        engine: EngineSettings,
        path: str,
        body: bytes,
        stream: bool,
        head: bytes = b"",
        content_type: bytes | None = None,
        on_sent: Callable[[UpstreamResponse], None] | None = None,
    ) -> UpstreamResponse:
        """Sends the request and returns once the response headers are in. `head`: more header
        lines, each ending in CRLF (the trace context); a JSON body unless `content_type` says
        otherwise. `on_sent` gets the response as soon as the request is written: closing it
        meanwhile ends the wait with UpstreamError (the caller may then send the request elsewhere)."""
        target = self._engines.get(engine.url)
        if target is None:
            target = self._engines[engine.url] = _Engine(engine)
        request = target.request(path, body, head, content_type)
        s = self._server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (s.first_byte_timeout if stream else s.request_timeout)
        idle_timeout = s.idle_timeout if stream else 0.0
        for attempt in range(STALE_RETRIES + 1):
            conn = self._take(target) if attempt == 0 else None
            if conn is None:
                conn = await self._connect(target, loop)
            response = UpstreamResponse(self, conn, deadline, idle_timeout)
            conn.response = response
            self._active.add(response)
            conn.transport.writelines(request)
            if on_sent is not None:
                on_sent(response)
            try:
                await response._headers_in
            except _Stale:
                self._active.discard(response)
                continue  # the engine had closed that idle connection: try a new one
            except BaseException:
                response.close()
                raise
            return response
        raise UpstreamError("the engine closed every connection before answering")

    def _take(self, target: _Engine) -> _Connection | None:
        idle = target.idle
        while idle:
            conn = idle.pop()  # the most recently used: least likely to be closing
            if not conn.closed and conn.loop.time() - conn.idle_since < KEEPALIVE:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self, target: _Engine, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._server.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, target),
                    target.host,
                    target.port,
                    ssl=target.ssl,
                    server_hostname=target.tls_name,
                )
        except (OSError, TimeoutError) as exc:
            raise EngineUnreachable(
                f"cannot connect to {target.host}:{target.port}: {exc or type(exc).__name__}"
            ) from None
        return conn

    def _finished(self, response: UpstreamResponse) -> None:
        self._active.discard(response)
        if response._conn.response is response:
            response._conn.response = None

    def _idle(self, conn: _Connection) -> None:
        if not conn.closed:
            conn.idle_since = conn.loop.time()
            conn.reused = False
            conn.target.idle.append(conn)

    async def _sweep(self) -> None:
        """Times out the responses past their deadline, and drops connections idle too long."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            for response in [r for r in self._active if r.deadline and r.deadline < now]:
                response._fail(TimeoutError("the engine did not answer in time"))
                response.close()
            for target in self._engines.values():
                target.idle = [c for c in target.idle if _fresh(c, now)]


def _fresh(conn: _Connection, now: float) -> bool:
    if not conn.closed and now - conn.idle_since < KEEPALIVE:
        return True
    conn.close()
    return False
