"""The admin API under /admin: keys, their usage, and model routes. Authorised by GATEWAY_ADMIN_KEY."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.auth import require_admin
from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.quota import Quota
from gateway.core.bodies import parse_json, read_body
from gateway.core.errors import Code, GatewayError, invalid, model_not_found
from gateway.dispatch.route_store import RouteStore, routes_json
from gateway.dispatch.routing import Router
from gateway.engines.pool import Engine
from gateway.proxy.context import Gateway
from gateway.settings import ConfigError, EngineSettings, parse_routes

MAX_ADMIN_BODY = 64 * 1024
MAX_HISTORY_DAYS = 40  # the day hashes live 40 days (gateway/access/quota.py)


class AdminRoutes:
    def __init__(
        self,
        admin_key: str | None,
        keys: KeyStore,
        quota: Quota,
        router: Router,
        store: RouteStore,
        engines: dict[str, EngineSettings],
        queues: Callable[[str], dict[str, Any]] | None = None,
        adapters: Callable[[Engine], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._admin_key = admin_key
        self._keys = keys
        self._quota = quota
        self._router = router
        self._store = store
        self._engines = engines
        self._queues = queues  # this process's scheduler: queues by band, engine slots
        self._adapters = adapters  # the LoRA adapters an engine holds (gateway/adapters/)

    def routes(self) -> list[Route]:
        return [
            Route("/admin/keys", self.create_key, methods=["POST"]),
            Route("/admin/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.get_key, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.update_key, methods=["PATCH"]),
            Route("/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
            Route("/admin/keys/{key_id}/usage", self.key_usage, methods=["GET"]),
            Route("/admin/engines", self.list_engines, methods=["GET"]),
            Route("/admin/models", self.list_models, methods=["GET"]),
            Route("/admin/models/{model}", self.get_model, methods=["GET"]),
            Route("/admin/models/{model}/routes", self.put_routes, methods=["PUT"]),
            Route("/admin/models/{model}/routes", self.reset_routes, methods=["DELETE"]),
        ]

    def _authorise(self, request: Request) -> None:
        require_admin(request.scope, self._admin_key)

    async def _json(self, request: Request) -> Any:
        return parse_json(await read_body(request.scope, request.receive, MAX_ADMIN_BODY))

    async def _key_or_404(self, key_id: str) -> ApiKey:
        key = await self._keys.record_for(key_id)
        if key is None:
            raise GatewayError(404, f"No key with id '{key_id}'.", param="id", code=Code.KEY_NOT_FOUND)
        return key

    async def create_key(self, request: Request) -> Response:
        self._authorise(request)
        fields = validate_key_fields(await self._json(request), partial=False, known_models=self._router.routes)
        key, secret = await self._keys.create(fields)
        return JSONResponse({**key.public(), "key": secret}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        self._authorise(request)
        keys = sorted(await self._keys.list(), key=lambda k: k.created_at)
        return JSONResponse({"object": "list", "data": [k.public() for k in keys]})

    async def get_key(self, request: Request) -> Response:
        self._authorise(request)
        return JSONResponse((await self._key_or_404(request.path_params["key_id"])).public())

    async def update_key(self, request: Request) -> Response:
        self._authorise(request)
        fields = validate_key_fields(await self._json(request), partial=True, known_models=self._router.routes)
        key = await self._keys.update(request.path_params["key_id"], fields)
        return JSONResponse((key or await self._key_or_404(request.path_params["key_id"])).public())

    async def revoke_key(self, request: Request) -> Response:
        self._authorise(request)
        key = await self._keys.revoke(request.path_params["key_id"])
        return JSONResponse((key or await self._key_or_404(request.path_params["key_id"])).public())

    async def key_usage(self, request: Request) -> Response:
        self._authorise(request)
        key = await self._key_or_404(request.path_params["key_id"])
        usage = await self._quota.usage(key.id)
        if "days" in request.query_params:
            usage["history"] = await self._quota.history(key.id, _days(request.query_params["days"]))
        return JSONResponse(usage)

    async def list_engines(self, request: Request) -> Response:
        """This process's view of the engines: health and load (for the console's live table)."""
        self._authorise(request)
        engines = self._router.pool.engines.values()
        data = [_engine_view(e) for e in engines]
        if self._adapters is not None:
            for view, engine in zip(data, engines, strict=True):
                view["adapters"] = self._adapters(engine)
                view["max_loras"] = engine.settings.max_loras
        return JSONResponse({"object": "list", "data": data})

    def _model_view(self, model: str) -> dict[str, Any]:
        current = self._router.routes[model]
        view = {
            "id": model,
            "routes": routes_json(current),
            "configured_routes": routes_json(self._router.configured(model)),
            "overridden": current != self._router.configured(model),
        }
        if self._queues is not None:
            view["scheduler"] = self._queues(model)
        return view

    def _model_or_404(self, request: Request) -> str:
        model = request.path_params["model"]
        if not self._router.knows(model):
            raise model_not_found(model)
        return str(model)

    async def list_models(self, request: Request) -> Response:
        self._authorise(request)
        return JSONResponse({"object": "list", "data": [self._model_view(m) for m in self._router.routes]})

    async def get_model(self, request: Request) -> Response:
        self._authorise(request)
        return JSONResponse(self._model_view(self._model_or_404(request)))

    async def put_routes(self, request: Request) -> Response:
        """Replaces a model's routes (e.g. shift canary weights) on every replica, no restart."""
        self._authorise(request)
        model = self._model_or_404(request)
        body = await self._json(request)
        if not isinstance(body, dict) or "routes" not in body:
            raise invalid('Send {"routes": [{"engines": [...], "model": ..., "weight": ...}]}.', param="routes")
        try:
            routes = parse_routes(body["routes"], model, self._engines, "request")
        except ConfigError as exc:
            raise invalid(str(exc).removeprefix("request: "), param="routes") from None
        await self._store.put(model, routes)
        return JSONResponse(self._model_view(model))

    async def reset_routes(self, request: Request) -> Response:
        """Rolls a model back to the routes of the config file."""
        self._authorise(request)
        model = self._model_or_404(request)
        await self._store.reset(model)
        return JSONResponse(self._model_view(model))


def _days(raw: str) -> int:
    try:
        days = int(raw)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_HISTORY_DAYS:
        raise invalid(f"'days' must be a whole number from 1 to {MAX_HISTORY_DAYS}, got {raw!r}.", param="days")
    return days


def _engine_view(engine: Engine) -> dict[str, Any]:
    s = engine.settings
    return {
        "name": s.name,
        "kind": s.kind,
        "url": s.url,
        "healthy": engine.healthy,
        "outstanding": engine.outstanding,
        "waiting": engine.waiting,
        "running": engine.running,
        "kv_usage": engine.kv_usage,
    }


# The paths AdminRoutes serves; without Redis they answer why the admin API is off instead of a
# bare route_not_found (the inference log and batch admin routes need only the admin key).
REDIS_PATHS = (
    "/admin/keys",
    "/admin/keys/{key_id}",
    "/admin/keys/{key_id}/usage",
    "/admin/engines",
    "/admin/models",
    "/admin/models/{model}",
    "/admin/models/{model}/routes",
)


def redis_off_routes(admin_key: str | None) -> list[Route]:
    """For a gateway without Redis: the key and route paths answer 404 `admin_disabled`, naming what to set."""
    missing = "redis.url in the config or GATEWAY_REDIS_URL"
    if admin_key is None:
        missing += ", and GATEWAY_ADMIN_KEY"
    message = f"The admin API is disabled: keys, models and engines are kept in Redis, and this gateway has none. Set {missing}, then restart it."

    async def disabled(request: Request) -> Response:
        raise GatewayError(404, message, code=Code.ADMIN_DISABLED)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return [Route(path, disabled, methods=methods) for path in REDIS_PATHS]


def admin_routes(gw: Gateway) -> list[Route]:
    """The admin API; without Redis, where keys and routes live, its paths say why it is off."""
    if gw.redis is None:
        return redis_off_routes(gw.settings.auth.admin_key)
    r = gw.redis
    engines = {e.name: e for e in gw.settings.engines}
    return AdminRoutes(
        gw.settings.auth.admin_key,
        r.keys,
        r.quota,
        gw.router,
        r.routes,
        engines,
        gw.scheduler.view,
        gw.adapters.engine_view if gw.adapters is not None else None,
    ).routes()
