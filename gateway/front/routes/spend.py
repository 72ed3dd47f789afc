"""The admin API's reports from the store: spend (`GET /admin/spend`, JSON or CSV, grouped by any
of key, team, org, model, route, day, hour over a window) and the audit log (`GET /admin/audit`).
A team admin sees its own teams' spend only; the audit log is for admins and viewers."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.access.key_fields import TEAM_ID
from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.times import iso, parse_time
from gateway.monitor.audit import AuditLog
from gateway.monitor.spend import SpendLog
from gateway.settings import NANOS
from gateway.store import SPEND_GROUPS, SpendQuery, Store

DEFAULT_DAYS = 31
MAX_FILTER = 256
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")


class SpendRoutes:
    def __init__(self, auth: AdminAuth, spend: SpendLog, audit: AuditLog, currency: str) -> None:
        self._auth = auth
        self._spend = spend
        self._audit = audit
        self._currency = currency

    def routes(self) -> list[Route]:
        return [
            Route("/admin/spend", self.spend, methods=["GET"]),
            Route("/admin/audit", self.audit, methods=["GET"]),
        ]

    def _store(self) -> Store:
        store = self._audit.store
        if store is None:
            raise GatewayError(503, "The store is not open yet; retry shortly.", code=Code.STORE_UNAVAILABLE)
        return store

    async def spend(self, request: Request) -> Response:
        actor = await self._auth.actor(request.scope)
        q = request.query_params
        groups = tuple(g.strip() for g in q.get("group_by", "").split(",") if g.strip())
        unknown = [g for g in groups if g not in SPEND_GROUPS]
        if unknown or len(set(groups)) != len(groups):
            raise invalid(f"'group_by' takes distinct names from: {', '.join(SPEND_GROUPS)}.", param="group_by")
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise invalid("'format' must be json or csv.", param="format")
        now = time.time()
        since = parse_time(q["since"], "since") if "since" in q else now - DEFAULT_DAYS * 86400
        until = parse_time(q["until"], "until") if "until" in q else now + 3600
        if until <= since:
            raise invalid("'until' must be after 'since'.", param="until")
        filters = {name: q.get(name) for name in ("key", "team", "org", "model")}
        for name, value in filters.items():
            if value is not None and not 1 <= len(value) <= MAX_FILTER:
                raise invalid(f"'{name}' must be 1 to {MAX_FILTER} characters.", param=name)
        teams = None if actor.sees_all else tuple(sorted(actor.teams))
        if filters["team"] is not None and not TEAM_ID.fullmatch(filters["team"]):
            raise invalid("'team' must be a team id.", param="team")
        store = self._store()
        await self._spend.flush()  # this replica's last seconds too
        rows = await store.query_spend(
            SpendQuery(
                groups,
                since,
                until,
                teams=teams,
                key_id=filters["key"],
                team_id=filters["team"],
                org_id=filters["org"],
                model=filters["model"],
            )
        )
        data = [self._row(r) for r in rows]
        if fmt == "csv":
            return Response(_csv(groups, data), media_type="text/csv; charset=utf-8")
        total = {name: sum(r[name] for r in data) for name in _SUMS}
        total["spend"] = sum(r["spend_nanos"] for r in data) / NANOS
        return JSONResponse(
            {
                "object": "list",
                "currency": self._currency,
                "since": iso(since),
                "until": iso(until),
                "group_by": list(groups),
                "data": data,
                "total": total,
            }
        )

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for name in ("key", "team", "org", "route"):
            if name in out:
                out[name] = out[name] or None  # "" in the store: none
        if "day" in out:
            out["day"] = datetime.fromtimestamp(out["day"], UTC).date().isoformat()
        if "hour" in out:
            out["hour"] = iso(out["hour"])
        out["spend_nanos"] = out.pop("spend")
        out["spend"] = out["spend_nanos"] / NANOS
        return out

    async def audit(self, request: Request) -> Response:
        actor = await self._auth.actor(request.scope)
        actor.require_read_all()
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
            after = int(q["after"]) if "after" in q else None
        except ValueError:
            raise invalid("'limit' and 'after' must be whole numbers.", param="limit") from None
        since = parse_time(q["since"], "since") if "since" in q else None
        for name in ("action", "team"):
            if name in q and not 1 <= len(q[name]) <= MAX_FILTER:
                raise invalid(f"'{name}' must be 1 to {MAX_FILTER} characters.", param=name)
        page = await self._store().query_audit(
            limit=limit, after=after, action=q.get("action"), team=q.get("team"), since=since
        )
        data = [
            {
                "id": e.id,
                "time": iso(e.time),
                "actor": e.actor,
                "role": e.role,
                "via": e.via,
                "address": e.address,
                "action": e.action,
                "target": e.target,
                "team": e.team,
                "before": orjson.loads(e.before) if e.before else None,
                "after": orjson.loads(e.after) if e.after else None,
            }
            for e in page.items
        ]
        return JSONResponse({"object": "list", "data": data, "has_more": page.has_more})


def _csv(groups: tuple[str, ...], data: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    columns = [*groups, *_SUMS, "spend"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in data:
        # a value a spreadsheet would run as a formula is quoted as text
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value
