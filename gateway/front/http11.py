"""The gateway's HTTP/1.1 server connection: httptools parses, this speaks ASGI to the app, with
the limits a public server needs.

Our own, rather than a server's private protocol class: uvicorn bounds none of these (the hostile
probe had 1-50 MB headers answered 200, 40 unfinished 8 MB headers taking the gateway from 60 to
388 MB, and 900 idle or slow connections open for minutes), and a subclass of its internals broke
with its releases. From `server:` in the config, each connection enforces:
- `max_header_bytes`: request line and headers larger than this get 431 and the connection is
  closed. Counted on the raw bytes as they arrive, so an unfinished header never holds more than
  the limit (plus one read) in memory;
- `header_timeout`: a connection that has not sent a complete head this long after it opened (or
  after the first byte of its next request) gets 408 and is closed; one that sent nothing at all
  is closed without a word;
- `body_timeout`: a body not complete this long after its headers gets 408 (slowloris);
- `keepalive_timeout`: an idle keep-alive connection is closed;
- `max_connections`: a connection over this many open in this process has its request answered
  503 with `retry-after`, then is closed. Connections to the admin listener are neither counted
  nor refused, so /metrics stays readable during a flood;
- while the process drains (gateway/proxy/drain.py), every response closes its connection.
Refusals (and malformed requests: 400) are written here, before the app sees the request, in
OpenAI's error shape.

The ASGI side is what Starlette expects of any server: `http.request` messages with the body as
it arrives (reading pauses above HIGH_WATER unread bytes), `http.disconnect` once the client is
gone or the response is complete, pipelined requests answered in order, `Expect: 100-continue`
honoured, responses framed by their content-length or chunked, and a send that waits while the
client's socket buffer is full (the relay's flow control rests on it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
from starlette.types import ASGIApp, Message

from gateway.core.errors import Code, GatewayError
from gateway.proxy.drain import Drain
from gateway.settings import ServerSettings

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024  # unread body bytes at which reading pauses until the app receives
LINGER = 2.0  # after a refusal: how long the client's remaining bytes are read and dropped
STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_ASGI = {"version": "3.0", "spec_version": "2.3"}


def headers_too_large(limit: int) -> GatewayError:
    return GatewayError(
        431, f"The request line and headers exceed the limit of {limit} bytes.", code=Code.HEADERS_TOO_LARGE
    )


def request_timeout(what: str, seconds: float) -> GatewayError:
    return GatewayError(
        408, f"The request {what} did not arrive within {seconds:g} seconds.", code=Code.REQUEST_TIMEOUT
    )


def too_many_connections(limit: int) -> GatewayError:
    return GatewayError(
        503,
        f"This gateway process has {limit} connections open, its limit; retry shortly.",
        code=Code.TOO_MANY_CONNECTIONS,
    )


class _Refusal(Exception):
    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class ServerState:
    """What the connections of one worker process share."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, drain: Drain, scheme: str) -> None:
        self.app = app
        self.settings = settings
        self.drain = drain
        self.scheme = scheme
        self.lifespan_state: dict[str, Any] = {}
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.counted = 0  # open connections on the public listener
        self._date = b""
        self._date_second = 0

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._date


class HttpConnection(asyncio.Protocol):
    """One client connection; `Cycle` is one request and its response on it."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.cycle: Cycle | None = None  # the request being answered
        self.reading: Cycle | None = None  # the request being read (later than `cycle` when pipelined)
        self.pipeline: deque[Cycle] = deque()
        self.read_paused = False
        self.write_paused = False
        self.writable: asyncio.Event | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect_100 = False
        self._header_bytes = 0  # raw bytes of the head being read
        self._reading_headers = True
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._over_cap = False
        self._refused = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        st = self.state
        st.connections.add(self)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        s = st.settings
        if self.server is None or self.server[1] != s.admin_port:
            self._counted = True
            st.counted += 1
            self._over_cap = st.counted > s.max_connections
        self._arm(s.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        st = self.state
        st.connections.discard(self)
        if self._counted:
            self._counted = False
            st.counted -= 1
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.event.set()
        self.pipeline.clear()
        self._resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_headers:
            self._header_bytes += len(data)
            if self._timer is None or self._timer_is_keepalive:
                self._arm(self.state.settings.header_timeout, self._headers_late)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refusal):
                self._refuse(exc.__context__.error)
            else:
                log.exception("HTTP parser callback failed")
                self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request was read as plain HTTP
        except httptools.HttpParserError:
            self._bad_request()
            return
        settings = self.state.settings
        if self._reading_headers and self._header_bytes > settings.max_header_bytes:
            self._refuse(headers_too_large(settings.max_header_bytes))

    def eof_received(self) -> bool | None:
        return None  # closes the transport; connection_lost follows

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        self._resume_writing()

    def _resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None:
            self.writable.set()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """The process drains: an idle connection closes now, a busy one after its response."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect_100 = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        st = self.state
        s = st.settings
        size = len(self._url) + sum(len(name) + len(value) + 4 for name, value in self._headers)
        if size > s.max_header_bytes:
            raise _Refusal(headers_too_large(s.max_header_bytes))
        if self._over_cap:
            raise _Refusal(too_many_connections(s.max_connections))
        self._reading_headers = False
        self._cancel_timer()
        parser = self.parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Refusal(GatewayError(400, "Invalid request target.", code=Code.INVALID_REQUEST)) from None
        raw_path = url.path or b"/"
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = urllib.parse.unquote(path)
        http_version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": st.scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self._headers,
            "state": st.lifespan_state.copy(),
        }
        keep_alive = http_version != "1.0" and parser.should_keep_alive() and not st.drain.draining
        cycle = Cycle(self, scope, keep_alive, self._expect_100, method == "HEAD")
        self.reading = cycle
        if self.cycle is None or self.cycle.response_complete:
            self._start(cycle)
        else:  # pipelined: answered after the ones before it
            self.pause_reading()
            self.pipeline.append(cycle)
        self._arm(s.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        cycle = self.reading
        if cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.event.set()

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._reading_headers = True
        self._header_bytes = 0
        cycle = self.reading
        if cycle is None or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.event.set()

    # -- cycles --------------------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.cycle = cycle
        task = self.loop.create_task(cycle.run(self.state.app))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def response_complete(self) -> None:
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.popleft())
        elif self._reading_headers and self._header_bytes and not self._refused:
            # Part of the next head arrived while this response was being written.
            self._arm(self.state.settings.header_timeout, self._headers_late)
        elif self._reading_headers:
            self._arm(self.state.settings.keepalive_timeout, self.transport.close, keepalive=True)

    # -- timers and refusals -------------------------------------------------------------------

    _timer_is_keepalive = False

    def _arm(self, seconds: float, callback: Callable[[], object], keepalive: bool = False) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)
        self._timer_is_keepalive = keepalive

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_is_keepalive = False

    def _headers_late(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being written; response_complete re-arms the timer
        if self._header_bytes == 0:
            self.transport.close()  # a connection that never asked anything
        else:
            self._refuse(request_timeout("headers", self.state.settings.header_timeout))

    def _body_late(self) -> None:
        self._timer = None
        cycle = self.reading
        if cycle is None or cycle.response_complete or not cycle.more_body or self.transport.is_closing():
            return
        self._refuse(request_timeout("body", self.state.settings.body_timeout))

    def _bad_request(self) -> None:
        # Not logged above debug: a flood of malformed requests must not become a flood of log lines.
        log.debug("invalid HTTP request received")
        self._refuse(GatewayError(400, "Invalid HTTP request.", code=Code.INVALID_REQUEST))

    def _refuse(self, error: GatewayError) -> None:
        """Answers `error` in place of the app and closes the connection."""
        self._refused = True
        self._cancel_timer()
        started = False
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's receive() says so and its sends are dropped
                cycle.event.set()
                started = started or cycle.response_started
        self.pipeline.clear()
        if started:
            self.transport.close()
            return
        body = error.payload()
        headers = [*error.raw_headers(), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        head = [STATUS_LINES[error.status], self.state.date()]
        head += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        if self.transport.can_write_eof():
            # A lingering close: closing with the client's bytes unread would send a reset that
            # can destroy the answer before the client reads it. So: end our side, read and drop
            # what the client still sends (nothing is kept), close when it does or after LINGER.
            self.transport.write_eof()
            self.resume_reading()
            self._timer = self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()


class Cycle:
    """One request and its response: the ASGI `receive` and `send` of one app call."""

    __slots__ = (
        "body",
        "chunked",
        "conn",
        "disconnected",
        "event",
        "expect_100",
        "head",
        "head_only",
        "keep_alive",
        "left",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
    )

    def __init__(
        self, conn: HttpConnection, scope: dict[str, Any], keep_alive: bool, expect_100: bool, head_only: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.head_only = head_only
        self.body = b""
        self.more_body = True
        self.disconnected = False
        self.event = asyncio.Event()
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.left = 0  # body bytes still due under the response's content-length
        self.head = b""  # a sized response's head, written with its first body bytes (one syscall)

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            # The front middleware answers every error itself; this is the net under it.
            if not isinstance(exc, asyncio.CancelledError):
                log.error("unhandled error in the app", exc_info=exc)
            if not self.response_started and not self.disconnected:
                body = GatewayError(500, "Internal error.", code=Code.INTERNAL_ERROR).payload()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                self.keep_alive = False
                await self.send({"type": "http.response.start", "status": 500, "headers": headers})
                await self.send({"type": "http.response.body", "body": body})
            elif not self.response_complete:
                self.conn.transport.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not self.response_complete and not self.disconnected:
                log.error("the app returned without completing its response")
                self.conn.transport.close()

    async def receive(self) -> Message:
        conn = self.conn
        if self.expect_100:
            self.expect_100 = False
            if not conn.transport.is_closing():
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.disconnected and not self.response_complete:
            conn.resume_reading()
            await self.event.wait()
            self.event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": self.body, "more_body": self.more_body}
        self.body = b""
        return message

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            assert conn.writable is not None
            await conn.writable.wait()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', got {message['type']!r}.")
            self._start(message)
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} after the response completed.")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', got {message['type']!r}.")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        transport = conn.transport
        if self.head_only:
            pass
        elif self.chunked:
            if body:
                transport.write(b"%x\r\n%b\r\n%b" % (len(body), body, b"" if more else b"0\r\n\r\n"))
            elif not more:
                transport.write(b"0\r\n\r\n")
        else:
            if len(body) > self.left:
                raise RuntimeError("Response content longer than its content-length.")
            self.left -= len(body)
            if self.head and body:
                transport.writelines((self.head, body))
                self.head = b""
            elif body:
                transport.write(body)
        if not more:
            if self.left and not self.head_only:
                raise RuntimeError("Response content shorter than its content-length.")
            self.response_complete = True
            self.event.set()
            if not self.keep_alive or conn.state.drain.draining:
                transport.close()
            else:
                conn.response_complete()

    def _start(self, message: Message) -> None:
        self.response_started = True
        self.expect_100 = False
        status: int = message["status"]
        content = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status, self.conn.state.date()]
        length: int | None = None
        close = False
        for name, value in message.get("headers", ()):
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"connection" and b"close" in value.lower():
                close = True
            content.append(b"%s: %s\r\n" % (name, value))
        if close:
            self.keep_alive = False
        elif not self.keep_alive or self.conn.state.drain.draining:
            self.keep_alive = False
            content.append(b"connection: close\r\n")
        if length is not None:
            self.left = length
        elif not self.head_only and status not in (204, 304) and status >= 200:
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        if length and not self.head_only:
            self.head = b"".join(content)  # the body follows at once
        else:
            self.conn.transport.write(b"".join(content))


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple | list) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None
