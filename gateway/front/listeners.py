"""Which routes each listener serves: with `server.admin_port`, the admin API, the console and the
metrics are served on the admin listener only, and are 404 on the public one.

The split is by path (`/admin`, `/ui`, `/metrics`), so a route added under those prefixes lands on
the right listener without being listed here. The probes (`/health`, `/ready`) are on both, and so
is the OpenAI API (`/v1`): the console's playground calls it from the page's own origin (its CSP
allows no other), which is the admin port. The admin port is private, and the API asks the same
client keys there, so this opens nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Router
from starlette.types import ASGIApp, Receive, Scope, Send

ADMIN_PREFIXES = ("/admin", "/ui", "/metrics")
SHARED_PREFIXES = ("/v1",)  # the OpenAI API: for the console's playground on the admin port
PROBES = ("/health", "/ready")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def is_admin_path(path: str) -> bool:
    return _under(path, ADMIN_PREFIXES)


def _path(route: BaseRoute) -> str:
    return str(getattr(route, "path", ""))


class ListenerSplit:
    """Sends each request to the routes of the listener it came in on (by the local port)."""

    def __init__(self, public: ASGIApp, admin: ASGIApp, admin_port: int) -> None:
        self.public = public
        self.admin = admin
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] != "lifespan" and server is not None and server[1] == self.admin_port:
            await self.admin(scope, receive, send)
        else:
            await self.public(scope, receive, send)  # the public router also runs the lifespan


def listener_app(routes: Sequence[BaseRoute], lifespan: Any, admin_port: int | None) -> ASGIApp:
    """One router with every route, or a public and an admin route set when there is an admin port.

    No slash redirects: Starlette's would answer `/v1/models/` with a bodiless 307 to an absolute
    URL built from the client's own Host header; an unknown path is our 404 like any other.
    """
    if admin_port is None:
        return Router(list(routes), lifespan=lifespan, redirect_slashes=False)
    public = [r for r in routes if not is_admin_path(_path(r))]
    admin = [r for r in routes if is_admin_path(_path(r)) or _under(_path(r), SHARED_PREFIXES) or _path(r) in PROBES]
    return ListenerSplit(
        Router(public, lifespan=lifespan, redirect_slashes=False), Router(admin, redirect_slashes=False), admin_port
    )
