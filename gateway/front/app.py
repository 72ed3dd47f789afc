"""build_app(settings): the routes, the front middleware and the lifespan; no logic, no work at import."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.batch.runner import BatchRunner
from gateway.front.listeners import listener_app
from gateway.front.middleware import Front
from gateway.front.readiness import readiness
from gateway.front.response_retention import ResponseRetention
from gateway.front.routes.adapters_admin import adapter_admin_routes
from gateway.front.routes.admin_api import admin_routes
from gateway.front.routes.audio import audio_routes
from gateway.front.routes.batches import BatchRoutes
from gateway.front.routes.cache_admin import cache_admin_routes
from gateway.front.routes.console import console_routes
from gateway.front.routes.files import FileRoutes
from gateway.front.routes.messages import messages_routes
from gateway.front.routes.monitor import monitor_routes
from gateway.front.routes.openai import openai_routes
from gateway.front.routes.passthrough import passthrough_routes
from gateway.front.routes.responses import StoredResponseRoutes
from gateway.observe.access_log import reopen_all
from gateway.proxy.context import Gateway
from gateway.proxy.drain import Drain
from gateway.settings import Settings, settings_from_env
from gateway.store.service import StoreUser


def build_app(
    settings: Settings,
    *,
    metrics_hub: str | None = None,
    drain: Drain | None = None,
    control_path: str | None = None,
) -> Front:
    """`metrics_hub`, `drain` and `control_path` come from the worker process's server (gateway/process/worker.py)."""
    gw = Gateway.build(settings, metrics_hub, drain, control_path)
    runner = BatchRunner(gw)
    users: list[StoreUser] = [runner, ResponseRetention(settings.store)]
    users += [u for u in (gw.audit, gw.spend) if u is not None]
    if gw.inference_log is not None:
        users.append(gw.inference_log)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        status, body = readiness(gw, request.query_params.get("model"))
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        body, media_type = await gw.metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=media_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncGenerator[None, None]:
        _on_sighup(reopen_all)  # logrotate moved the access log file: write to a new one
        await gw.upstream.start()
        gw.pool.start()
        await gw.access.start()
        if gw.redis is not None:
            gw.redis.start()
        if gw.adapters is not None:
            gw.adapters.start()
        if gw.cache is not None:
            gw.cache.start()
        await gw.store.start(users)  # files, batches and the inference log
        await gw.control.start()
        await gw.metrics.start()
        try:
            yield
        finally:
            await gw.control.stop()
            await gw.store.stop()  # the runner hands back its lines, the log writes its last rows
            if gw.adapters is not None:
                await gw.adapters.stop()
            if gw.cache is not None:
                await gw.cache.stop()
            if gw.redis is not None:
                await gw.redis.stop()
            gw.counter.close()
            await gw.access.stop()
            await gw.pool.stop()
            await gw.upstream.close()
            if gw.observe is not None:
                await gw.observe.stop()  # the last access log lines, the spans still queued
            await gw.metrics.stop()  # with several workers: the last counts, to the main process

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
        *cache_admin_routes(gw),
        *adapter_admin_routes(gw),
        *monitor_routes(gw, gw.admin_auth),
        *console_routes(),
    ]
    return Front(listener_app(routes, lifespan, settings.server.admin_port), gw.observe)


def _on_sighup(handler: Callable[[], None]) -> None:
    """SIGHUP calls `handler` on the event loop (only possible in the main thread; an app run by
    another ASGI server, or in a test's thread, keeps that server's handling)."""
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, handler)


def app_from_env() -> Front:
    """For serving the app under another ASGI server (`uvicorn --factory gateway.front.app:app_from_env`,
    with LLM_GATEWAY_CONFIG set): no managed engines, no drain of ours, and each process's /metrics
    reports that process alone. `llm-gateway serve` (gateway/process/main.py) is the normal way."""
    return build_app(settings_from_env())
