"""The admin API as one set of routes: keys, engines and models (admin.py), teams and organizations
(teams.py), spend and the audit log (spend.py), and sign-in (signin.py); or, without Redis, where
keys and teams live, the paths that say why it is off."""

from __future__ import annotations

from starlette.routing import Route

from gateway.front.routes.admin import AdminRoutes, redis_off_routes
from gateway.front.routes.signin import SignInRoutes
from gateway.front.routes.spend import SpendRoutes
from gateway.front.routes.teams import TeamRoutes
from gateway.proxy.context import Gateway


def admin_routes(gw: Gateway) -> list[Route]:
    r, audit, spend = gw.redis, gw.audit, gw.spend
    if r is None or audit is None or spend is None:
        return redis_off_routes(gw.settings.auth.admin_key)
    auth = gw.admin_auth
    engines = {e.name: e for e in gw.settings.engines}
    return [
        *(SignInRoutes(r.sign_in).routes() if r.sign_in is not None else []),
        *AdminRoutes(
            auth,
            r.keys,
            r.teams,
            r.quota,
            gw.router,
            r.routes,
            engines,
            audit,
            gw.scheduler.view,
            gw.adapters.engine_view if gw.adapters is not None else None,
        ).routes(),
        *TeamRoutes(auth, r.teams, r.keys, r.quota, gw.router, audit).routes(),
        *SpendRoutes(auth, spend, audit, gw.settings.pricing.currency).routes(),
    ]
