"""The admin API over the inference log: `GET /admin/requests` and `GET /admin/models/{name}/report`.

Authorised by GATEWAY_ADMIN_KEY like the rest of /admin, and mounted whether or not Redis is
configured (the log lives in the store). Query parameters are checked strictly: an unknown,
repeated or malformed one is a 400 naming it. Times are ISO 8601 or Unix seconds in, ISO 8601
(UTC) out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.core.errors import Code, GatewayError, invalid, model_not_found
from gateway.core.text import check_text
from gateway.core.times import iso, parse_time
from gateway.front.params import path_id
from gateway.monitor.report import read_report
from gateway.proxy.context import Gateway
from gateway.store import InferenceRecord, RequestFilter, Store

log = logging.getLogger(__name__)

REQUEST_PARAMS = ("key_id", "model", "route", "status", "since", "until", "limit", "after", "api")
REPORT_PARAMS = ("since", "until", "baseline_since", "baseline_until")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_TEXT = 256
DEFAULT_WINDOW = 3600.0


def monitor_routes(gw: Gateway, auth: AdminAuth | None = None) -> list[Route]:
    routes = MonitorRoutes(gw, auth or AdminAuth(gw.settings.auth.admin_key))
    return [
        Route("/admin/requests", routes.list_requests, methods=["GET"]),
        Route("/admin/models/{model}/report", routes.model_report, methods=["GET"]),
    ]


class MonitorRoutes:
    def __init__(self, gw: Gateway, auth: AdminAuth) -> None:
        self._gw = gw
        self._auth = auth

    async def _store(self, request: Request) -> Store:
        # the log holds every team's requests (and captured payloads): admins and viewers only
        (await self._auth.actor(request.scope)).require_read_all()
        return self._gw.store.require()

    async def list_requests(self, request: Request) -> Response:
        """The inference log, newest first; `after` is the `id` of the last row of the previous page."""
        store = await self._store(request)
        q = query(request, REQUEST_PARAMS)
        status = _int(q, "status", 100, 599)
        where = RequestFilter(
            key_id=_text(q, "key_id"),
            model=_text(q, "model"),
            route=_text(q, "route"),
            status=status,
            since=_time(q, "since"),
            until=_time(q, "until"),
            api=_text(q, "api"),
        )
        limit = _int(q, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
        after = _int(q, "after", 0, 2**63 - 1)
        try:
            page = await store.query_requests(where, limit=limit, after=after)
        except Exception as exc:
            raise _unavailable(exc) from None
        data = [record_json(r) for r in page.items]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": page.has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def model_report(self, request: Request) -> Response:
        """Routes side by side over [since, until) and drift against [baseline_since, baseline_until).
        Defaults: the last hour, and the window of the same length just before it."""
        store = await self._store(request)
        model = path_id(request, "model")
        if not self._gw.router.knows(model):
            raise model_not_found(model)
        q = query(request, REPORT_PARAMS)
        until = _time(q, "until")
        until = time.time() if until is None else until
        since = _time(q, "since")
        since = until - DEFAULT_WINDOW if since is None else since
        _ordered(since, until, "since")
        baseline_until = _time(q, "baseline_until")
        baseline_until = since if baseline_until is None else baseline_until
        baseline_since = _time(q, "baseline_since")
        baseline_since = baseline_until - (until - since) if baseline_since is None else baseline_since
        _ordered(baseline_since, baseline_until, "baseline_since")
        try:
            report = await read_report(
                store.report_rows(model, since, until), store.report_rows(model, baseline_since, baseline_until)
            )
        except Exception as exc:
            raise _unavailable(exc) from None
        order = [r.name for r in self._gw.router.routes[model]]
        return JSONResponse(
            {
                "object": "model.report",
                "model": model,
                "window": {"since": iso(since), "until": iso(until)},
                "baseline": {"since": iso(baseline_since), "until": iso(baseline_until)},
                **report.as_json(order),
            }
        )


def record_json(r: InferenceRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "time": iso(round(r.time, 3)),
        "request_id": r.request_id,
        "key_id": r.key_id,
        "model": r.model,
        "api": r.api,
        "route": r.route,
        "engine": r.engine,
        "status": r.status,
        "error_code": r.error_code,
        "stream": r.stream,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "ttft": r.ttft,
        "duration": r.duration,
        "finish_reason": r.finish_reason,
        "client_disconnect": r.client_disconnect,
        "batch_id": r.batch_id,
        "payload": None if r.payload is None else orjson.loads(r.payload),
    }


def query(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and all known; empty ones count as absent."""
    params = request.query_params
    out = {}
    for name in params:
        if name not in allowed:
            raise invalid(f"Unknown query parameter '{name}' (allowed: {', '.join(allowed)}).", param=name)
        values = params.getlist(name)
        if len(values) > 1:
            raise invalid(f"'{name}' may be given once.", param=name)
        if values[0] != "":
            out[name] = values[0]
    return out


def _text(q: Mapping[str, str], name: str) -> str | None:
    value = q.get(name)
    return None if value is None else check_text(value, name, MAX_TEXT)


def _int(q: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    value = q.get(name)
    if value is None:
        return None
    # int() refuses more than 4,300 digits: a longer one is not a number we take anyway
    if not (value.isascii() and value.isdigit()) or len(value) > 30 or not low <= int(value) <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return int(value)


def _time(q: Mapping[str, str], name: str) -> float | None:
    value = q.get(name)
    return None if value is None else parse_time(value, name)


def _ordered(since: float, until: float, param: str) -> None:
    if since >= until:
        raise invalid(f"The window is empty: '{param}' must be before its end.", param=param)


def _unavailable(exc: Exception) -> GatewayError:
    log.warning("reading the inference log failed: %s", exc)
    return GatewayError(
        503, f"The store could not be read ({type(exc).__name__}); retry shortly.", code=Code.STORE_UNAVAILABLE
    )
