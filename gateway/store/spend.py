"""Spend in the SQL store: hourly rollups of requests, tokens and money per key, team,
organization, model and route, added to by every replica (an upsert that sums), read grouped for
`GET /admin/spend`. History here outlives the Redis counters that admission reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.store.common import SqlBase
from gateway.store.db import Conn
from gateway.store.records import SpendQuery, SpendRow

_KEY = ("hour", "key_id", "team_id", "org_id", "model", "route")
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "spend")
_GROUP_SQL = {
    "key": "key_id",
    "team": "team_id",
    "org": "org_id",
    "model": "model",
    "route": "route",
    "day": "(hour / 86400) * 86400",
    "hour": "hour",
}
_UPSERT = (
    f"INSERT INTO spend_hourly ({', '.join(_KEY + _SUMS)}) VALUES ({', '.join(f'${i + 1}' for i in range(11))})"
    f" ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = spend_hourly.{c} + excluded.{c}" for c in _SUMS)
)


class SpendOps(SqlBase):
    async def add_spend(self, rows: Sequence[SpendRow]) -> None:
        if not rows:
            return
        async with self.db.write() as conn:
            await add_spend_rows(conn, rows)

    async def query_spend(self, q: SpendQuery) -> list[dict[str, Any]]:
        """Rows of the groups (each `day`/`hour` as Unix seconds), sums of the window's hours."""
        args: list[Any] = [int(q.since // 3600 * 3600), float(q.until)]
        clauses = ["hour >= $1", "hour < $2"]
        for column, value in (("key_id", q.key_id), ("team_id", q.team_id), ("org_id", q.org_id), ("model", q.model)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if q.teams is not None:
            if not q.teams:
                return []
            marks = []
            for team in q.teams:
                args.append(team)
                marks.append(f"${len(args)}")
            clauses.append(f"team_id IN ({', '.join(marks)})")
        groups = [f"{_GROUP_SQL[g]} AS g_{g}" for g in q.group_by]
        sums = [f"SUM({c}) AS {c}" for c in _SUMS]
        sql = f"SELECT {', '.join([*groups, *sums])} FROM spend_hourly WHERE {' AND '.join(clauses)}"
        if q.group_by:
            names = ", ".join(_GROUP_SQL[g] for g in q.group_by)
            sql += f" GROUP BY {names} ORDER BY {names}"
        async with self.db.read() as conn:
            rows = await conn.fetch(sql, *args)
        out = []
        for row in rows:
            if row["requests"] is None:
                continue  # no rows at all: SUM over nothing
            item: dict[str, Any] = {g: row[f"g_{g}"] for g in q.group_by}
            for g in ("day", "hour"):
                if g in item:
                    item[g] = int(item[g])
            item.update({c: int(row[c]) for c in _SUMS})
            out.append(item)
        return out


async def add_spend_rows(conn: Conn, rows: Sequence[SpendRow]) -> None:
    """Adds the rows in the caller's transaction (also that of batch lines' results,
    gateway/store/lines.py), one statement per distinct row."""
    sums: dict[tuple[int, str, str, str, str, str], list[int]] = {}
    for r in rows:
        held = sums.setdefault((int(r.hour), r.key_id, r.team_id, r.org_id, r.model, r.route), [0, 0, 0, 0, 0])
        for i, n in enumerate((r.requests, r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.spend)):
            held[i] += int(n)
    # Sorted: two replicas adding to the same rows lock them in the same order (no deadlock).
    for key, figures in sorted(sums.items()):
        await conn.execute(_UPSERT, *key, *figures)
