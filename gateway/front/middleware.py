"""The front of every HTTP request (pure ASGI; BaseHTTPMiddleware breaks streaming and contextvars).

One place for what every route shares: the request id (`x-request-id` on every response, the
client's own when it sent a sane one), and the one mapping of errors to OpenAI-shaped responses:
a GatewayError is answered as it says, Starlette's 404/405 become ours, a client that went away
gets nothing, and anything else is a bug: logged with its traceback, answered 500 in our shape.
When observing is on (gateway/observe/), it begins and ends each request's observation: status,
bytes out, a client that hung up, the error answered, and the opt-in Server-Timing header.
"""

from __future__ import annotations

import itertools
import logging
import os

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.apis.messages import anthropic
from gateway.core.errors import Code, GatewayError, internal_error
from gateway.core.request import ClientDisconnected
from gateway.front.params import check_query
from gateway.observe.observer import CURRENT, Observation, Observer

_MAX_ID = 200
DISCONNECTED = 499  # nginx's code for a client that went away
ANTHROPIC_PATHS = ("/v1/messages/", "/v1/messages")
log = logging.getLogger(__name__)


# New request ids: 32 hex characters, a random per-process prefix and a counter (unique, and no
# system call per request; an id identifies a request, it guards nothing).
_ID_PREFIX = os.urandom(8).hex()
_numbers = itertools.count()


def request_id_of(scope: Scope) -> bytes:
    """The client's x-request-id when it is a sane one (printable ASCII, bounded), else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if 0 < len(value) <= _MAX_ID and all(32 < c < 127 for c in value):
                return bytes(value)
            break
    return f"{_ID_PREFIX}{next(_numbers):016x}".encode()


def _from_http(scope: Scope, exc: HTTPException) -> GatewayError:
    if exc.status_code == 404:
        return GatewayError(
            404, f"No route for {scope.get('path')}.", code=Code.ROUTE_NOT_FOUND, type="invalid_request_error"
        )
    if exc.status_code == 405:
        headers = {"allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
        message = f"Method {scope.get('method')} not allowed here."
        return GatewayError(405, message, code=Code.METHOD_NOT_ALLOWED, headers=headers)
    return GatewayError(exc.status_code, str(exc.detail), type="invalid_request_error")


_GONE = object()  # what `_serve` answers when the client went away


class Front:
    def __init__(self, app: ASGIApp, observe: Observer | None = None) -> None:
        self.app = app
        self.observe = observe  # the access log, traces, Server-Timing (gateway/observe/); None: all off
        self.active = 0  # requests in here now: a replaced configuration is let go at 0 (gateway/front/running.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        scope["request_id"] = rid
        scope["app"] = self  # Starlette's router then raises HTTPException for 404/405 instead of answering
        self.active += 1
        try:
            if self.observe is not None and (o := self.observe.begin(scope, rid)) is not None:
                await self._observed(scope, receive, send, rid, o)
            else:
                await self._serve(scope, receive, send, rid)
        finally:
            self.active -= 1

    async def _observed(self, scope: Scope, receive: Receive, send: Send, rid: bytes, o: Observation) -> None:
        observe = self.observe
        assert observe is not None

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                o.bytes_out += len(message.get("body", b""))
            else:
                o.status = message["status"]
                if observe.server_timing and o.admit_end:
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"server-timing", observe.server_timing_header(o)),
                    ]
            await send(message)

        token = CURRENT.set(o)
        ended: object = None
        try:
            ended = await self._serve(scope, receive, observed_send, rid)
        finally:
            CURRENT.reset(token)
            if ended is _GONE:
                o.hung_up = True
            elif isinstance(ended, GatewayError) and o.error_code is None and ended.code is not None:
                o.error_code = str(ended.code)
            if o.hung_up:
                o.status = DISCONNECTED
            observe.end(o)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> object:
        """Runs the app and answers its errors; returns the error answered, _GONE when the client
        went away, else None."""
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        try:
            if scope["query_string"]:  # every cursor and filter of every route, before any route reads it
                check_query(scope)
            await self.app(scope, receive, send_with_id)
        except (ClientDisconnected, ClientDisconnect):
            return _GONE  # nobody is listening
        except GatewayError as exc:
            error = exc
        except HTTPException as exc:
            error = _from_http(scope, exc)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            error = internal_error()
        else:
            return None
        if started:
            return error  # too late for a status; a stream already ended itself in-band
        if str(scope.get("path", "")).startswith(ANTHROPIC_PATHS):
            error = anthropic(error)  # Anthropic's clients read Anthropic's errors, 404 and 405 included
        try:
            await send_with_id({"type": "http.response.start", "status": error.status, "headers": error.raw_headers()})
            await send_with_id({"type": "http.response.body", "body": error.payload()})
        except OSError:
            return _GONE  # the client left while we answered
        return error
