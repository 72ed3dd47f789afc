"""The audit log in the SQL store: one row per admin change, paged newest first."""

from __future__ import annotations

from gateway.store.common import SqlBase, newest_first
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
        rows, more = await newest_first(
            self.db, "audit_log", AUDIT_COLUMNS, limit, (("action", action), ("team", team)), since=since, after=after
        )
        return Page([_entry(r) for r in rows], has_more=more)
