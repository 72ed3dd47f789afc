"""The public OpenAI API: parse -> admit (key, quota) -> pick engine -> relay -> reconcile."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from engines.http import BodyTooLarge, ClientDisconnected, read_limited, unless_disconnected
from gateway.access import Access, Ticket
from gateway.context import Gateway
from gateway.errors import GatewayError, invalid
from gateway.middleware import request_id_of
from gateway.relay import StreamRelay, StreamStats
from gateway.routing import prefix_key

log = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _TryAnother(Exception):
    def __init__(self, error: GatewayError) -> None:
        self.error = error


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    prompt_field: str  # the field that must be present: messages, prompt, input
    streams: bool


CHAT = Endpoint("/v1/chat/completions", "messages", True)
COMPLETIONS = Endpoint("/v1/completions", "prompt", True)
EMBEDDINGS = Endpoint("/v1/embeddings", "input", False)


async def read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request, limit)
    except BodyTooLarge as exc:
        raise GatewayError(413, str(exc), code="request_too_large") from None


def parse_request(raw: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """Checks what the gateway itself relies on; the engine validates the rest."""
    try:
        body = orjson.loads(raw)
    except ValueError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string.", param="model")
    if body.get(endpoint.prompt_field) is None:
        raise invalid(f"'{endpoint.prompt_field}' is required.", param=endpoint.prompt_field)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean.", param="stream")
    if stream and not endpoint.streams:
        raise invalid("This endpoint does not stream.", param="stream")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise invalid(f"'{name}' must be an integer of at least 1.", param=name)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", param="stream_options")
    return body


class OpenAIRoutes:
    def __init__(self, gateway: Gateway, access: Access) -> None:
        self.gw = gateway
        self.access = access

    async def asgi(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        """The hot path as bare ASGI: no router, no middleware stack, no wrapped send per chunk."""
        rid = request_id_of(scope)
        request = Request(scope, receive)
        try:
            response = await self._serve(request, endpoint)
        except GatewayError as exc:
            response = exc.response()
        except ClientDisconnected:
            return
        except Exception:
            log.exception("unhandled error on POST %s", endpoint.path)
            response = GatewayError(500, "Internal error in the gateway.", code="internal_error").response()
        response.raw_headers.append((b"x-request-id", rid))
        await response(scope, receive, send)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, COMPLETIONS)

    async def embeddings(self, request: Request) -> Response:
        return await self._serve(request, EMBEDDINGS)

    async def models(self, request: Request) -> Response:
        principal = await self.access.authenticate(request)
        created = int(self.gw.started)
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "llm-gateway"}
            for name in self.gw.router.routes
            if principal.may_use(name)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _serve(self, request: Request, endpoint: Endpoint) -> Response:
        gw = self.gw
        principal = await self.access.authenticate(request)
        body = parse_request(await read_body(request, gw.settings.server.max_body_bytes), endpoint)
        model = body["model"]
        if not gw.router.knows(model):
            raise GatewayError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        if not principal.may_use(model):
            raise GatewayError(
                403, f"This key may not use the model '{model}'.", param="model", code="model_not_allowed"
            )
        stream = bool(body.get("stream"))
        ticket = await self.access.admit(principal, model, body)
        started = time.perf_counter()
        gw.metrics.in_flight.inc()
        try:
            # Watching the client from the start means a client that leaves while the engine
            # works (non-streaming: until the whole answer) closes the upstream request at once.
            route = self._route(request, endpoint, body, model, stream, ticket, started)
            response = await unless_disconnected(request, route)
        except BaseException as exc:
            gw.metrics.in_flight.dec()
            if isinstance(exc, ClientDisconnected):
                gw.metrics.client_disconnects.labels(model).inc()
            status = exc.status if isinstance(exc, GatewayError) else 499
            await self._finish(ticket, model, "-", status, None, started, estimated_completion=0)
            raise
        return response

    async def _route(
        self,
        request: Request,
        endpoint: Endpoint,
        body: dict[str, Any],
        model: str,
        stream: bool,
        ticket: Ticket,
        started: float,
    ) -> Response:
        gw = self.gw
        client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            # Always ask for usage so accounting is exact; stripped again if the client did not ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        tried: set[str] = set()
        last_error: GatewayError | None = None
        router = gw.router
        prefix = prefix_key(body, router.routing.prefix_chars) if router.affinity else None
        for attempt in range(2):
            pick = router.pick(model, frozenset(tried), prefix)
            if pick is None:
                break
            engine = pick.engine
            tried.add(engine.name)
            if attempt:
                gw.metrics.retries.labels(model).inc()
            gw.metrics.routing.labels(model, engine.name).inc()
            body["model"] = pick.upstream_model
            payload = orjson.dumps(body)
            engine.outstanding += 1
            try:
                return await self._attempt(engine.name, endpoint, payload, model, stream, client_usage, ticket, started)
            except _TryAnother as retry:
                last_error = retry.error
            finally:
                if not ticket.handed_over:
                    engine.outstanding -= 1
        if last_error is None:
            last_error = GatewayError(503, f"No healthy engine serves '{model}' right now.", code="no_healthy_engine")
        raise last_error

    async def _attempt(
        self,
        engine_name: str,
        endpoint: Endpoint,
        payload: bytes,
        model: str,
        stream: bool,
        client_usage: bool,
        ticket: Ticket,
        started: float,
    ) -> Response:
        """One try on one engine. Raises _TryAnother while nothing has reached the client yet."""
        gw = self.gw
        engine = gw.pool.engines[engine_name]
        metrics = gw.metrics
        try:
            upstream = await gw.upstream.post(
                engine.settings.url + endpoint.path, payload, engine.settings.api_key, stream
            )
        except (aiohttp.ClientError, OSError) as exc:
            metrics.upstream_errors.labels(engine.name, "connect").inc()
            gw.pool.mark_failed(engine, f"{type(exc).__name__}: {exc}")
            raise _TryAnother(
                GatewayError(503, "No engine could take the request.", code="engine_unavailable")
            ) from None
        except TimeoutError:
            metrics.upstream_errors.labels(engine.name, "timeout").inc()
            raise GatewayError(504, "The engine did not answer in time.", code="upstream_timeout") from None
        handed_over = False
        try:
            if upstream.status == 429 or upstream.status >= 500:
                metrics.upstream_errors.labels(engine.name, "overloaded" if upstream.status == 429 else "5xx").inc()
                raise _TryAnother(await self._upstream_error(upstream))
            if upstream.status != 200 or not stream:
                content = await gw.upstream.read_all(upstream)
                usage = _usage_of(content) if upstream.status == 200 else None
                await self._finish(ticket, model, engine.name, upstream.status, usage, started, 0)
                metrics.in_flight.dec()
                ctype = upstream.headers.get("content-type", "application/json")
                return Response(content, upstream.status, headers=dict(ticket.headers), media_type=ctype)
            stats = StreamStats(started=started, on_gap=metrics.itl.labels(model).observe)
            relay = StreamRelay(
                upstream,
                [*_SSE_HEADERS, *ticket.header_pairs()],
                strip_usage=not client_usage,
                send_timeout=gw.settings.server.send_timeout,
                stats=stats,
            )
            handed_over = ticket.handed_over = True
            return _StreamResponse(relay, self, ticket, model, engine.name)
        except TimeoutError:
            metrics.upstream_errors.labels(engine.name, "timeout").inc()
            raise GatewayError(504, "The engine did not answer in time.", code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            metrics.upstream_errors.labels(engine.name, "read").inc()
            raise GatewayError(502, f"The engine failed: {type(exc).__name__}.", code="upstream_error") from None
        finally:
            if not handed_over:
                upstream.release()

    async def _upstream_error(self, upstream: aiohttp.ClientResponse) -> GatewayError:
        try:
            detail = json.loads(await upstream.read())["error"]["message"]
        except (ValueError, KeyError, TypeError, aiohttp.ClientError, TimeoutError):
            detail = f"status {upstream.status}"
        if upstream.status == 429:
            return GatewayError(503, f"Every engine is busy: {detail}", code="engines_overloaded")
        return GatewayError(502, f"The engine failed: {detail}", code="upstream_error")

    async def _finish(
        self,
        ticket: Ticket,
        model: str,
        engine: str,
        status: int,
        usage: dict[str, Any] | None,
        started: float,
        estimated_completion: int,
    ) -> None:
        m = self.gw.metrics
        m.requests.labels(model if self.gw.router.knows(model) else "unknown", engine, str(status)).inc()
        m.latency.labels(model).observe(time.perf_counter() - started)
        prompt = int(usage.get("prompt_tokens") or 0) if usage else 0
        completion = int(usage.get("completion_tokens") or 0) if usage else estimated_completion
        if prompt:
            m.prompt_tokens.labels(model).inc(prompt)
        if completion:
            m.completion_tokens.labels(model).inc(completion)
        await self.access.finish(ticket, status, usage is not None, prompt, completion)


class _StreamResponse(Response):
    """Runs the relay, then the accounting, whatever way the stream ended."""

    def __init__(self, relay: StreamRelay, routes: OpenAIRoutes, ticket: Ticket, model: str, engine: str) -> None:
        self.raw_headers = relay.headers  # one list: headers added here go out with the stream
        self._relay = relay
        self._routes = routes
        self._ticket = ticket
        self._model = model
        self._engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gw = self._routes.gw
        stats = self._relay.stats
        gw.metrics.streams.inc()
        try:
            await self._relay(scope, receive, send)
        finally:
            gw.metrics.streams.dec()
            gw.metrics.in_flight.dec()
            engine = gw.pool.engines[self._engine]
            engine.outstanding -= 1
            if stats.first_chunk:
                gw.metrics.ttft.labels(self._model).observe(stats.first_chunk - stats.started)
            if stats.disconnected:
                gw.metrics.client_disconnects.labels(self._model).inc()
                status = 499
            elif stats.error:
                gw.metrics.upstream_errors.labels(self._engine, "mid_stream").inc()
                status = 502
            else:
                status = 200
            # Without the engine's usage (aborted, failed), each relayed chunk counts as one token.
            estimate = max(0, stats.chunks - 1)
            await asyncio.shield(
                self._routes._finish(
                    self._ticket, self._model, self._engine, status, stats.usage, stats.started, estimate
                )
            )


def _usage_of(content: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
