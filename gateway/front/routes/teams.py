"""The admin API of teams and organizations: /admin/teams, /admin/orgs (create, read, change,
delete), a team's keys and usage. Admins change them; a team admin reads its own teams; a viewer
reads all. Every change is audited."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.access.keys import KeyStore
from gateway.access.levels import team_level
from gateway.access.quota import Quota
from gateway.access.roles import Actor
from gateway.access.team_fields import ORG_FIELDS, TEAM_FIELDS, validate_group_fields
from gateway.access.teams import Group, TeamStore, not_found
from gateway.core.request import parse_json, read_body
from gateway.dispatch.routing import Router
from gateway.front.params import path_id
from gateway.front.routes.admin import MAX_ADMIN_BODY, days
from gateway.monitor.audit import AuditLog


class TeamRoutes:
    def __init__(
        self, auth: AdminAuth, teams: TeamStore, keys: KeyStore, quota: Quota, router: Router, audit: AuditLog
    ) -> None:
        self._auth = auth
        self._teams = teams
        self._keys = keys
        self._quota = quota
        self._router = router
        self._audit = audit

    def routes(self) -> list[Route]:
        return [
            Route("/admin/teams", self.create_team, methods=["POST"]),
            Route("/admin/teams", self.list_teams, methods=["GET"]),
            Route("/admin/teams/{team_id}", self.get_team, methods=["GET"]),
            Route("/admin/teams/{team_id}", self.update_team, methods=["PATCH"]),
            Route("/admin/teams/{team_id}", self.delete_team, methods=["DELETE"]),
            Route("/admin/teams/{team_id}/keys", self.team_keys, methods=["GET"]),
            Route("/admin/teams/{team_id}/usage", self.team_usage, methods=["GET"]),
            Route("/admin/orgs", self.create_org, methods=["POST"]),
            Route("/admin/orgs", self.list_orgs, methods=["GET"]),
            Route("/admin/orgs/{org_id}", self.get_org, methods=["GET"]),
            Route("/admin/orgs/{org_id}", self.update_org, methods=["PATCH"]),
            Route("/admin/orgs/{org_id}", self.delete_org, methods=["DELETE"]),
            Route("/admin/orgs/{org_id}/usage", self.org_usage, methods=["GET"]),
        ]

    async def _actor(self, request: Request) -> Actor:
        return await self._auth.actor(request.scope)

    async def _fields(self, request: Request, allowed: tuple[str, ...], partial: bool) -> dict[str, Any]:
        body = parse_json(await read_body(request.scope, request.receive, MAX_ADMIN_BODY))
        return validate_group_fields(body, allowed, partial=partial, known_models=self._router.routes)

    async def _team(self, request: Request, actor: Actor) -> Group:
        team_id = path_id(request, "team_id")
        actor.require_read_team(team_id)
        team = await self._teams.get_team(team_id)
        if team is None:
            raise not_found("team", team_id)
        return team

    async def _org(self, request: Request) -> Group:
        org_id = path_id(request, "org_id")
        org = await self._teams.get_org(org_id)
        if org is None:
            raise not_found("org", org_id)
        return org

    # ---- teams --------------------------------------------------------------------------------

    async def create_team(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()
        team = await self._teams.create_team(await self._fields(request, TEAM_FIELDS, partial=False))
        await self._audit.record(actor, "team.create", team.id, team=team.id, after=team.public())
        return JSONResponse(team.public(), status_code=201)

    async def list_teams(self, request: Request) -> Response:
        actor = await self._actor(request)
        teams = [t.public() for t in await self._teams.list_teams() if actor.may_read_team(t.id)]
        return JSONResponse({"object": "list", "data": teams})

    async def get_team(self, request: Request) -> Response:
        actor = await self._actor(request)
        return JSONResponse((await self._team(request, actor)).public())

    async def update_team(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()  # a team admin manages its keys, not its own limits
        fields = await self._fields(request, TEAM_FIELDS, partial=True)
        before = await self._team(request, actor)
        team = await self._teams.update_team(before.id, fields)
        if team is None:
            raise not_found("team", before.id)
        await self._quota.recall([team_level(self._teams.prefix, team.id, team.org)])  # its keys' slices go back
        await self._audit.record(
            actor, "team.update", team.id, team=team.id, before=before.public(), after=team.public()
        )
        return JSONResponse(team.public())

    async def delete_team(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()
        team = await self._teams.delete_team(path_id(request, "team_id"))
        if team is None:
            raise not_found("team", path_id(request, "team_id"))
        await self._audit.record(actor, "team.delete", team.id, team=team.id, before=team.public())
        return JSONResponse({"id": team.id, "object": "team.deleted", "deleted": True})

    async def team_keys(self, request: Request) -> Response:
        actor = await self._actor(request)
        team = await self._team(request, actor)
        keys = [k for k in await self._keys.list() if k.team == team.id]
        return JSONResponse({"object": "list", "data": [k.public() for k in keys]})

    async def team_usage(self, request: Request) -> Response:
        actor = await self._actor(request)
        team = await self._team(request, actor)
        level = await self._teams.team_level(team.id)
        if level is None:
            raise not_found("team", team.id)
        usage = await self._quota.usage(level)
        if "days" in request.query_params:
            usage["history"] = await self._quota.history(level, days(request.query_params["days"]))
        return JSONResponse(usage)

    # ---- organizations ------------------------------------------------------------------------

    async def create_org(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()
        org = await self._teams.create_org(await self._fields(request, ORG_FIELDS, partial=False))
        await self._audit.record(actor, "org.create", org.id, after=org.public())
        return JSONResponse(org.public(), status_code=201)

    async def list_orgs(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_read_all()
        return JSONResponse({"object": "list", "data": [o.public() for o in await self._teams.list_orgs()]})

    async def get_org(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_read_all()
        return JSONResponse((await self._org(request)).public())

    async def update_org(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()
        fields = await self._fields(request, ORG_FIELDS, partial=True)
        before = await self._org(request)
        org = await self._teams.update_org(before.id, fields)
        if org is None:
            raise not_found("org", before.id)
        await self._quota.recall([self._teams.org_level(org.id)])
        await self._audit.record(actor, "org.update", org.id, before=before.public(), after=org.public())
        return JSONResponse(org.public())

    async def delete_org(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_admin()
        org = await self._teams.delete_org(path_id(request, "org_id"))
        if org is None:
            raise not_found("org", path_id(request, "org_id"))
        await self._audit.record(actor, "org.delete", org.id, before=org.public())
        return JSONResponse({"id": org.id, "object": "organization.deleted", "deleted": True})

    async def org_usage(self, request: Request) -> Response:
        actor = await self._actor(request)
        actor.require_read_all()
        org = await self._org(request)
        level = self._teams.org_level(org.id)
        usage = await self._quota.usage(level)
        if "days" in request.query_params:
            usage["history"] = await self._quota.history(level, days(request.query_params["days"]))
        return JSONResponse(usage)
