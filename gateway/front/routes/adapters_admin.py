"""`/admin/adapters`: LoRA adapters served as models. `GET` lists them (where each is loaded),
`POST {name, base, path}` adds one on every replica (kept in Redis), `DELETE
/admin/adapters/{name}` removes one added that way (config adapters stay in the config)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.core.errors import Code, GatewayError
from gateway.core.request import parse_json, read_body
from gateway.front.params import path_id
from gateway.proxy.context import Gateway

MAX_BODY = 16 * 1024


def adapter_admin_routes(gw: Gateway) -> list[Route]:
    auth = gw.admin_auth
    adapters = gw.adapters

    def service() -> object:
        if adapters is None:
            raise GatewayError(
                404,
                "Adapters are off: add an `adapters:` section to the config (and Redis), then restart.",
                code=Code.ADMIN_DISABLED,
            )
        return adapters

    async def listing(request: Request) -> Response:
        await auth.actor(request.scope)  # any role may read, as the models
        service()
        assert adapters is not None
        data = [adapters.public(name) for name in sorted(adapters.registry.all)]
        return JSONResponse({"object": "list", "data": data})

    async def create(request: Request) -> Response:
        actor = await auth.actor(request.scope)
        actor.require_admin()
        service()
        assert adapters is not None
        payload = parse_json(await read_body(request.scope, request.receive, MAX_BODY))
        added = await adapters.add(payload)
        if gw.audit is not None:
            await gw.audit.record(actor, "adapter.add", str(added.get("id", "")), after=added)
        return JSONResponse(added, status_code=201)

    async def show(request: Request) -> Response:
        await auth.actor(request.scope)
        service()
        assert adapters is not None
        name = path_id(request, "name")
        if name not in adapters.registry.all:
            raise GatewayError(404, f"No adapter named '{name}'.", param="name", code=Code.MODEL_NOT_FOUND)
        return JSONResponse(adapters.public(name))

    async def delete(request: Request) -> Response:
        actor = await auth.actor(request.scope)
        actor.require_admin()
        service()
        assert adapters is not None
        name = path_id(request, "name")
        if not await adapters.registry.remove(name):
            raise GatewayError(404, f"No adapter named '{name}'.", param="name", code=Code.MODEL_NOT_FOUND)
        if gw.audit is not None:
            await gw.audit.record(actor, "adapter.remove", name)
        return JSONResponse({"id": name, "object": "adapter", "deleted": True})

    return [
        Route("/admin/adapters", listing, methods=["GET"]),
        Route("/admin/adapters", create, methods=["POST"]),
        Route("/admin/adapters/{name}", show, methods=["GET"]),
        Route("/admin/adapters/{name}", delete, methods=["DELETE"]),
    ]
