"""The admin API under /admin: keys, their usage, and model routes. Who may do what: the caller's
role (gateway/access/roles.py), found by gateway/access/admin_auth.py; every change is audited."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.quota import Quota
from gateway.access.roles import Actor
from gateway.access.teams import TeamStore, not_found
from gateway.core.errors import Code, GatewayError, invalid, model_not_found
from gateway.core.request import parse_json, read_body
from gateway.dispatch.route_store import RouteStore, routes_json
from gateway.dispatch.routing import Router
from gateway.engines.pool import Engine
from gateway.front.params import path_id
from gateway.monitor.audit import AuditLog
from gateway.settings import ConfigError, EngineSettings, parse_routes

MAX_ADMIN_BODY = 64 * 1024
MAX_HISTORY_DAYS = 40  # the day hashes live 40 days (gateway/access/quota.py)


class AdminRoutes:
    def __init__(
        self,
        auth: AdminAuth,
        keys: KeyStore,
        teams: TeamStore,
        quota: Quota,
        router: Router,
        store: RouteStore,
        engines: dict[str, EngineSettings],
        audit: AuditLog,
        queues: Callable[[str], dict[str, Any]] | None = None,
        adapters: Callable[[Engine], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._auth = auth
        self._keys = keys
        self._teams = teams
        self._audit = audit
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

    async def _authorise(self, request: Request) -> Actor:
        return await self._auth.actor(request.scope)

    async def _team_org(self, team: str | None) -> str | None:
        """The organization of a team a key is being put in (404 when there is no such team)."""
        if team is None:
            return None
        exists, org = await self._teams.team_org(team)
        if not exists:
            raise not_found("team", team)
        return org

    async def _json(self, request: Request) -> Any:
        return parse_json(await read_body(request.scope, request.receive, MAX_ADMIN_BODY))

    async def _key_or_404(self, key_id: str) -> ApiKey:
        key = await self._keys.record_for(key_id)
        if key is None:
            raise GatewayError(404, f"No key with id '{key_id}'.", param="id", code=Code.KEY_NOT_FOUND)
        return key

    async def create_key(self, request: Request) -> Response:
        actor = await self._authorise(request)
        fields = validate_key_fields(await self._json(request), partial=False, known_models=self._router.routes)
        actor.require_change_team(fields.get("team"))
        key, secret = await self._keys.create(fields, await self._team_org(fields.get("team")))
        await self._audit.record(actor, "key.create", key.id, team=key.team, after=key.public())
        return JSONResponse({**key.public(), "key": secret}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        actor = await self._authorise(request)
        keys = sorted(await self._keys.list(), key=lambda k: k.created_at)
        seen = [k.public() for k in keys if actor.may_read_team(k.team)]
        return JSONResponse({"object": "list", "data": seen})

    async def get_key(self, request: Request) -> Response:
        actor = await self._authorise(request)
        key = await self._key_or_404(path_id(request, "key_id"))
        actor.require_read_team(key.team)
        return JSONResponse(key.public())

    async def update_key(self, request: Request) -> Response:
        actor = await self._authorise(request)
        fields = validate_key_fields(await self._json(request), partial=True, known_models=self._router.routes)
        before = await self._key_or_404(path_id(request, "key_id"))
        actor.require_change_team(before.team)
        org = None
        if "team" in fields:
            actor.require_change_team(fields["team"])
            org = await self._team_org(fields["team"])
        key = await self._keys.update(before.id, fields, org) or await self._key_or_404(before.id)
        await self._quota.recall(self._quota.levels(before)[:1])  # its slices go back before the answer
        await self._audit.record(actor, "key.update", key.id, team=key.team, before=before.public(), after=key.public())
        return JSONResponse(key.public())

    async def revoke_key(self, request: Request) -> Response:
        actor = await self._authorise(request)
        before = await self._key_or_404(path_id(request, "key_id"))
        actor.require_change_team(before.team)
        key = await self._keys.revoke(before.id) or await self._key_or_404(before.id)
        await self._quota.recall(self._quota.levels(before)[:1])
        await self._audit.record(actor, "key.revoke", key.id, team=key.team, before=before.public(), after=key.public())
        return JSONResponse(key.public())

    async def key_usage(self, request: Request) -> Response:
        actor = await self._authorise(request)
        key = await self._key_or_404(path_id(request, "key_id"))
        actor.require_read_team(key.team)
        level = self._quota.levels(key)[0]
        usage = await self._quota.usage(level)
        if "days" in request.query_params:
            usage["history"] = await self._quota.history(level, days(request.query_params["days"]))
        return JSONResponse(usage)

    async def list_engines(self, request: Request) -> Response:
        """This process's view of the engines: health and load (for the console's live table)."""
        await self._authorise(request)
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
        model = path_id(request, "model")
        if not self._router.knows(model):
            raise model_not_found(model)
        return str(model)

    async def list_models(self, request: Request) -> Response:
        await self._authorise(request)
        return JSONResponse({"object": "list", "data": [self._model_view(m) for m in self._router.routes]})

    async def get_model(self, request: Request) -> Response:
        await self._authorise(request)
        return JSONResponse(self._model_view(self._model_or_404(request)))

    async def put_routes(self, request: Request) -> Response:
        """Replaces a model's routes (e.g. shift canary weights) on every replica, no restart."""
        actor = await self._authorise(request)
        actor.require_admin()
        model = self._model_or_404(request)
        before = self._model_view(model)["routes"]
        body = await self._json(request)
        if not isinstance(body, dict) or "routes" not in body:
            raise invalid('Send {"routes": [{"engines": [...], "model": ..., "weight": ...}]}.', param="routes")
        try:
            routes = parse_routes(body["routes"], model, self._engines, "request")
        except ConfigError as exc:
            raise invalid(str(exc).removeprefix("request: "), param="routes") from None
        await self._store.put(model, routes)
        view = self._model_view(model)
        await self._audit.record(actor, "routes.put", model, before=before, after=view["routes"])
        return JSONResponse(view)

    async def reset_routes(self, request: Request) -> Response:
        """Rolls a model back to the routes of the config file."""
        actor = await self._authorise(request)
        actor.require_admin()
        model = self._model_or_404(request)
        before = self._model_view(model)["routes"]
        await self._store.reset(model)
        view = self._model_view(model)
        await self._audit.record(actor, "routes.reset", model, before=before, after=view["routes"])
        return JSONResponse(view)


def days(raw: str) -> int:
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
        "healthy": engine.healthy,  # gets traffic: its health check passes and its breaker allows
        "health_check": engine.checked,
        "breaker": _breaker_view(engine),
        "outstanding": engine.outstanding,
        "waiting": engine.waiting,
        "running": engine.running,
        "kv_usage": engine.kv_usage,
    }


def _breaker_view(engine: Engine) -> dict[str, Any]:
    """The engine's circuit breaker in the process that answered (gateway/engines/breaker.py)."""
    b = engine.breaker
    return {
        "state": str(b.state),
        "consecutive_failures": b.errors,
        "last_failure": b.last_error or None,
        "opened_at": int(b.opened_at) if b.opened_at else None,
        "opens": b.opens,
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
