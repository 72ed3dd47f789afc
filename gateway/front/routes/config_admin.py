"""`POST /admin/reload` (the admin role) and `GET /admin/config` (any admin role): the running
configuration reloaded from its file, and shown with its secrets masked and its version.

A reload answers 200 with its outcome (`reloaded` or `unchanged`); 400 `invalid_config` with the
file's error, as `llm-gateway serve` would say it at start; 409 `restart_required` listing what
only a restart can change; 503 `reload_failed` when it could not be put in place. In each refusal
the running configuration stays, and the message says its version. Every attempt is audited.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.core.errors import Code, GatewayError
from gateway.front.reloads import Reloads
from gateway.monitor.audit import AuditLog
from gateway.settings.changes import Outcome
from gateway.settings.masked import masked

REFUSALS = {
    "invalid": (400, Code.INVALID_CONFIG, "The configuration file is not valid"),
    "restart_required": (409, Code.RESTART_REQUIRED, "The configuration changes what only a restart can"),
    "failed": (503, Code.RELOAD_FAILED, "The configuration could not be put in place"),
}


def config_routes(auth: AdminAuth, reloads: Reloads, audit: AuditLog | None) -> list[Route]:
    async def reload(request: Request) -> Response:
        actor = await auth.actor(request.scope)
        actor.require_admin()
        outcome = await reloads.request(f"reload asked through the admin API by {actor.subject}")
        if audit is not None:
            before = {"version": outcome.previous or outcome.version}
            await audit.record(actor, "config.reload", outcome.version, before=before, after=outcome.json())
        if outcome.ok:
            return JSONResponse(outcome.json())
        raise refusal(outcome)

    async def config(request: Request) -> Response:
        await auth.actor(request.scope)  # every role reads it: the secrets are masked
        running = reloads.running
        current = running.current
        settings = current.gw.settings
        return JSONResponse(
            {
                "version": current.version,
                "loaded_at": current.loaded_at,
                "previous": running.previous,
                "reloads": running.reloads,
                "source": settings.source,
                "config": masked(settings),
            }
        )

    return [
        Route("/admin/reload", reload, methods=["POST"]),
        Route("/admin/config", config, methods=["GET"]),
    ]


def refusal(outcome: Outcome) -> GatewayError:
    status, code, what = REFUSALS.get(outcome.status, REFUSALS["failed"])
    running = f"the running configuration (version {outcome.version}) stays"
    return GatewayError(status, f"{what}; {running}: {'; '.join(outcome.errors)}", code=code)
