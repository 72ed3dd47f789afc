"""build_app(settings): the routes, the front middleware and the lifespan; no logic, no work at import."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.batch.runner import BatchRunner
from gateway.front.listeners import listener_app
from gateway.front.middleware import Front
from gateway.front.readiness import readiness
from gateway.front.routes.adapters_admin import adapter_admin_routes
from gateway.front.routes.admin import admin_routes
from gateway.front.routes.batches import BatchRoutes
from gateway.front.routes.cache_admin import cache_admin_routes
from gateway.front.routes.console import console_routes
from gateway.front.routes.files import FileRoutes
from gateway.front.routes.monitor import monitor_routes
from gateway.front.routes.openai import openai_routes
from gateway.proxy.context import Gateway
from gateway.proxy.drain import Drain
from gateway.settings import Settings, multiprocess_dir, settings_from_env
from gateway.store.service import StoreUser


def build_app(
    settings: Settings,
    *,
    multiprocess: str | None = None,
    drain: Drain | None = None,
    control_path: str | None = None,
) -> Front:
    """`drain` and `control_path` come from the worker process's server (gateway/process/worker.py)."""
    gw = Gateway.build(settings, multiprocess, drain, control_path)
    runner = BatchRunner(gw)
    users: list[StoreUser] = [runner]
    if gw.inference_log is not None:
        users.append(gw.inference_log)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        status, body = readiness(gw, request.query_params.get("model"))
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncGenerator[None, None]:
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
            await gw.access.stop()
            await gw.pool.stop()
            await gw.upstream.close()

    routes: list[BaseRoute] = [
        *openai_routes(gw),
        *FileRoutes(gw).routes(),
        *BatchRoutes(gw, runner).routes(),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *admin_routes(gw),
        *cache_admin_routes(gw),
        *adapter_admin_routes(gw),
        *monitor_routes(gw),
        *console_routes(),
    ]
    return Front(listener_app(routes, lifespan, settings.server.admin_port))


def app_from_env() -> Front:
    """For serving the app under another ASGI server (`uvicorn --factory gateway.front.app:app_from_env`,
    with LLM_GATEWAY_CONFIG set): no managed engines, no drain of ours. `llm-gateway serve`
    (gateway/process/main.py) is the normal way."""
    return build_app(settings_from_env(), multiprocess=multiprocess_dir())
