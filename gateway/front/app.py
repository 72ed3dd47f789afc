"""build_app(settings): the process's app (gateway/front/running.py), each configuration's routes
behind the front middleware, and the reloads; no logic, no work at import."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.batch.runner import BatchRunner
from gateway.front.listeners import listener_app
from gateway.front.middleware import Front
from gateway.front.readiness import readiness
from gateway.front.reloads import Reloads
from gateway.front.response_retention import ResponseRetention
from gateway.front.routes.adapters_admin import adapter_admin_routes
from gateway.front.routes.admin_api import admin_routes
from gateway.front.routes.audio import audio_routes
from gateway.front.routes.batches import BatchRoutes
from gateway.front.routes.cache_admin import cache_admin_routes
from gateway.front.routes.config_admin import config_routes
from gateway.front.routes.console import console_routes
from gateway.front.routes.files import FileRoutes
from gateway.front.routes.messages import messages_routes
from gateway.front.routes.monitor import monitor_routes
from gateway.front.routes.openai import openai_routes
from gateway.front.routes.passthrough import passthrough_routes
from gateway.front.routes.responses import StoredResponseRoutes
from gateway.front.running import Running
from gateway.proxy.context import Current, Gateway
from gateway.proxy.drain import Drain
from gateway.settings import Settings, config_path_from_env
from gateway.settings.source import ConfigSource
from gateway.store.service import StoreUser


def build_app(
    settings: Settings,
    *,
    metrics_hub: str | None = None,
    drain: Drain | None = None,
    control_path: str | None = None,
    source: ConfigSource | None = None,
    version: str = "",
    replica: str | None = None,
) -> Running:
    """`metrics_hub`, `drain` and `control_path` come from the worker process's server (gateway/process/worker.py);
    `source` is where a reload reads the configuration again (gateway/front/reloads.py), `version`
    the version of `settings` as read from it, `replica` names this replica's processes."""
    gw = Gateway.build(settings, metrics_hub, drain, control_path)
    holder = Current(gw)
    runner = BatchRunner(holder)
    reloads = Reloads(source, replica or secrets.token_hex(6), main=control_path is not None)
    users: list[StoreUser] = [runner, ResponseRetention(settings.store)]
    running = Running(gw, version, lambda g: _front(g, runner, reloads), users, holder)
    reloads.attach(running)

    async def sighup() -> None:
        _on_sighup(reloads.hup)  # logrotate moved the access log file: write to a new one

    running.on_start.append(sighup)
    return running


def _front(gw: Gateway, runner: BatchRunner, reloads: Reloads) -> Front:
    """One configuration's app: every route over `gw`, behind the front middleware."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        status, body = readiness(gw, request.query_params.get("model"))
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        body, media_type = await gw.metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=media_type)

    routes: list[BaseRoute] = [
        *openai_routes(gw),
        *StoredResponseRoutes(gw).routes(),
        *messages_routes(gw),
        *passthrough_routes(gw),
        *audio_routes(gw),
        *FileRoutes(gw).routes(),
        *BatchRoutes(gw, runner, gw.admin_auth).routes(),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *admin_routes(gw),
        *config_routes(gw.admin_auth, reloads, gw.audit),
        *cache_admin_routes(gw),
        *adapter_admin_routes(gw),
        *monitor_routes(gw, gw.admin_auth),
        *console_routes(),
    ]
    return Front(listener_app(routes, None, gw.settings.server.admin_port), gw.observe)


def _on_sighup(handler: Callable[[], None]) -> None:
    """SIGHUP calls `handler` on the event loop (only possible in the main thread; an app run by
    another ASGI server, or in a test's thread, keeps that server's handling)."""
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, handler)


def app_from_env() -> Running:
    """For serving the app under another ASGI server (`uvicorn --factory gateway.front.app:app_from_env`,
    with LLM_GATEWAY_CONFIG set): no managed engines, no drain of ours; SIGHUP or the admin API
    reload the file. `llm-gateway serve` (gateway/process/main.py) is the normal way."""
    source = ConfigSource(config_path_from_env())
    loaded = source.load()
    return build_app(loaded.settings, source=source, version=loaded.version)
