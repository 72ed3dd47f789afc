"""The audit log in the SQL store: one row per admin change, paged newest first."""

from __future__ import annotations

from gateway.store.common import SqlBase, page_size
from gateway.store.db import Row
from gateway.store.records import AuditEntry, Page

AUDIT_COLUMNS = ("time", "actor", "role", "via", "address", "action", "target", "team", "before_json", "after_json")


def _entry(row: Row) -> AuditEntry:
    values = {c.removesuffix("_json"): row[c] for c in AUDIT_COLUMNS}
    return AuditEntry(**values, id=int(row["seq"]))


class AuditOps(SqlBase):
    async def append_audit(self, entry: AuditEntry) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                f"INSERT INTO audit_log ({', '.join(AUDIT_COLUMNS)}) VALUES ({', '.join(f'${i + 1}' for i in range(10))})",
                float(entry.time),
                entry.actor,
                entry.role,
                entry.via,
                entry.address,
                entry.action,
                entry.target,
                entry.team,
                entry.before,
                entry.after,
            )

    async def query_audit(
        self,
        *,
        limit: int = 100,
        after: int | None = None,
        action: str | None = None,
        team: str | None = None,
        since: float | None = None,
    ) -> Page[AuditEntry]:
        n = page_size(limit)
        args: list[object] = []
        clauses = []
        for column, value in (("action", action), ("team", team)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if since is not None:
            args.append(float(since))
            clauses.append(f"time >= ${len(args)}")
        if after is not None:
            args.append(int(after))
            clauses.append(f"seq < ${len(args)}")
        args.append(n + 1)
        sql = (
            f"SELECT seq, {', '.join(AUDIT_COLUMNS)} FROM audit_log WHERE {' AND '.join(clauses) or 'TRUE'}"
            f" ORDER BY seq DESC LIMIT ${len(args)}"
        )
        async with self.db.read() as conn:
            rows = await conn.fetch(sql, *args)
        return Page([_entry(r) for r in rows[:n]], has_more=len(rows) > n)
