"""The gateway's HTTP/1.1 connection: uvicorn's httptools protocol plus the limits a public server needs.

uvicorn bounds none of these (the hostile probe had 1-50 MB headers answered 200, 40 unfinished
8 MB headers taking the gateway from 60 to 388 MB, and 900 idle or slow connections open for
minutes), so each connection here enforces, from `server:` in the config:

- `max_header_bytes`: request line and headers larger than this get 431 and the connection is
  closed. Counted on the raw bytes as they arrive, so an unfinished header never holds more than
  the limit (plus one read) in memory;
- `header_timeout`: a connection that has not sent a complete head this long after it opened (or
  after the first byte of its next request) gets 408 and is closed; one that sent nothing at all
  is closed without a word;
- `body_timeout`: a body not complete this long after its headers gets 408 (slowloris);
- `keepalive_timeout`: an idle keep-alive connection is closed (uvicorn's own timer);
- `max_connections`: a connection over this many open in this process has its request answered
  503 with `retry-after`, then is closed. Connections to the admin listener are neither counted
  nor refused, so /metrics stays readable during a flood;
- while the process drains (gateway/proxy/drain.py), every response closes its connection.

Refusals (and malformed requests: 400) are written here, before the app sees the request, in
OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.core.errors import Code, GatewayError
from gateway.proxy.drain import Drain
from gateway.settings import ServerSettings

LINGER = 2.0  # after a refusal: how long the client's remaining bytes are read and dropped


class _Refusal(Exception):
    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class _Count:
    def __init__(self) -> None:
        self.open = 0


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


class GatewayHttpProtocol(HttpToolsProtocol):
    settings: ClassVar[ServerSettings]
    drain: ClassVar[Drain]
    counter: ClassVar[_Count]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0  # raw bytes of the head being read
        self._reading_headers = True
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._over_cap = False
        self._refused = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        s = self.settings
        if self.server is None or self.server[1] != s.admin_port:
            self._counted = True
            self.counter.open += 1
            self._over_cap = self.counter.open > s.max_connections
        self._arm(s.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self.counter.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_headers:
            self._header_bytes += len(data)
            if self._timer is None:
                self._arm(self.settings.header_timeout, self._headers_late)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refusal):
                self._refuse(exc.__context__.error)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._reading_headers and self._header_bytes > self.settings.max_header_bytes:
            self._refuse(headers_too_large(self.settings.max_header_bytes))

    # -- parser callbacks ----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        s = self.settings
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > s.max_header_bytes:
            raise _Refusal(headers_too_large(s.max_header_bytes))
        if self._over_cap:
            raise _Refusal(too_many_connections(s.max_connections))
        self._reading_headers = False
        self._cancel_timer()
        super().on_headers_complete()
        if self.drain.draining and self.cycle is not None:
            self.cycle.keep_alive = False
        self._arm(s.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_timer()
        self._reading_headers = True
        self._header_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading_headers and self._header_bytes and self._timer is None and not self._refused:
            # Part of the next head arrived while this response was being written.
            self._arm(self.settings.header_timeout, self._headers_late)

    # -- timers and refusals -------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Any) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being written; on_response_complete re-arms the timer
        if self._header_bytes == 0:
            self.transport.close()  # a connection that never asked anything
        else:
            self._refuse(request_timeout("headers", self.settings.header_timeout))

    def _body_late(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.more_body or self.transport.is_closing():
            return
        self._refuse(request_timeout("body", self.settings.body_timeout))

    def _bad_request(self) -> None:
        # Not logged above debug: a flood of malformed requests must not become a flood of log lines.
        self.logger.debug("invalid HTTP request received")
        self._refuse(GatewayError(400, "Invalid HTTP request.", code=Code.INVALID_REQUEST))

    def _refuse(self, error: GatewayError) -> None:
        """Answers `error` in place of the app and closes the connection."""
        self._refused = True
        self._cancel_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() says so and its sends are dropped
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        body = error.payload()
        head = [STATUS_LINE[error.status]]
        headers = [
            *self.server_state.default_headers,
            *error.raw_headers(),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        head += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        if self.transport.can_write_eof():
            # A lingering close: closing with the client's bytes unread would send a reset that
            # can destroy the answer before the client reads it. So: end our side, read and drop
            # what the client still sends (nothing is kept), close when it does or after LINGER.
            self.transport.write_eof()
            self.flow.resume_reading()
            self._timer = self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()


def limited_protocol(settings: ServerSettings, drain: Drain) -> type[GatewayHttpProtocol]:
    """The protocol class for uvicorn's `Config(http=...)`, bound to this process's limits."""
    attrs = {"settings": settings, "drain": drain, "counter": _Count()}
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), attrs)
