"""Batches (OpenAI Batch API objects) in the SQL store: creation with all lines, status
compare-and-set, and the per-batch lease under which one replica at a time runs a batch.

Every status change is one UPDATE whose WHERE names the statuses it may start from, so two
replicas racing (a cancel and a finalize, two runners) cannot both win. A lease is a holder
name and an expiry on the batch row; a holder that dies stops renewing, and once the expiry
passes any replica may take the batch over.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection, Iterable, Sequence
from typing import Any, Literal

import orjson

from gateway.store.common import SqlBase, aiter_any, new_id, owner_clause, page_size, sql_list
from gateway.store.db import Conn, Row, UniqueViolation
from gateway.store.records import (
    BATCH_STATUSES,
    CANCELLABLE_STATUSES,
    EXPIRABLE_STATUSES,
    FINAL_STATUSES,
    LEASABLE_STATUSES,
    Batch,
    BatchError,
    BatchSpec,
    DuplicateCustomIdError,
    NewLine,
    OwnerScope,
    Page,
    RequestCounts,
)

BATCH_COLUMNS = (
    "id, owner, endpoint, input_file_id, completion_window, metadata, status, errors, output_file_id,"
    " error_file_id, created_at, expires_at, in_progress_at, finalizing_at, completed_at, failed_at, expired_at,"
    " cancelling_at, cancelled_at, total_count, completed_count, failed_count, lease_holder, lease_expires"
)
LINE_INSERT_CHUNK = 5000
# After a big batch goes in, PostgreSQL's statistics still say its lines are few until autovacuum
# gets round to them, and it claims lines with a bitmap scan of every unfinished line plus a sort
# instead of walking the partial index in line order: 25 ms a claim instead of 1-3 ms on a
# 100,000-line batch (measured). Fresh statistics right after the insert fix the plan.
ANALYZE_AFTER_LINES = 1000
# finalize_batch's business: these need the result files written in the same transaction.
FINALIZED_STATUSES = ("completed", "expired", "cancelled")


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def batch_record(row: Row) -> Batch:
    errors = orjson.loads(row["errors"]) if row["errors"] else []
    return Batch(
        id=row["id"],
        owner=row["owner"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=int(row["completion_window"]),
        metadata=orjson.loads(row["metadata"]) if row["metadata"] else None,
        status=row["status"],
        errors=tuple(BatchError(**e) for e in errors),
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        created_at=int(row["created_at"]),
        expires_at=int(row["expires_at"]),
        in_progress_at=_opt_int(row["in_progress_at"]),
        finalizing_at=_opt_int(row["finalizing_at"]),
        completed_at=_opt_int(row["completed_at"]),
        failed_at=_opt_int(row["failed_at"]),
        expired_at=_opt_int(row["expired_at"]),
        cancelling_at=_opt_int(row["cancelling_at"]),
        cancelled_at=_opt_int(row["cancelled_at"]),
        request_counts=RequestCounts(int(row["total_count"]), int(row["completed_count"]), int(row["failed_count"])),
        lease_holder=row["lease_holder"],
        lease_expires=None if row["lease_expires"] is None else float(row["lease_expires"]),
    )


def errors_json(errors: Sequence[BatchError]) -> str:
    return orjson.dumps(
        [{"code": e.code, "message": e.message, "param": e.param, "line": e.line} for e in errors]
    ).decode()


def check_statuses(statuses: Collection[str]) -> None:
    unknown = [s for s in statuses if s not in BATCH_STATUSES]
    if unknown or not statuses:
        raise ValueError(f"not batch statuses: {sorted(unknown) or 'none given'}")


class BatchOps(SqlBase):
    async def create_batch(
        self,
        spec: BatchSpec,
        lines: Iterable[NewLine] | AsyncIterable[NewLine],
        *,
        status: Literal["validating", "in_progress"] = "in_progress",
    ) -> Batch:
        if status not in ("validating", "in_progress"):
            raise ValueError(f"a batch starts validating or in_progress, not {status!r}")
        batch_id = new_id("batch_")
        try:
            async with self.db.write() as conn:
                await self._insert_batch(conn, batch_id, spec, status)
                total, chunk = 0, []
                async for line in aiter_any(lines):
                    total += 1
                    chunk.append((batch_id, total, line.custom_id, line.body))
                    if len(chunk) >= LINE_INSERT_CHUNK:
                        await conn.insert_rows("batch_lines", ("batch_id", "line", "custom_id", "body"), chunk)
                        chunk = []
                if chunk:
                    await conn.insert_rows("batch_lines", ("batch_id", "line", "custom_id", "body"), chunk)
                row = await conn.fetchrow(
                    f"UPDATE batches SET total_count = $2 WHERE id = $1 RETURNING {BATCH_COLUMNS}", batch_id, total
                )
        except UniqueViolation:
            raise DuplicateCustomIdError() from None
        assert row is not None
        if total >= ANALYZE_AFTER_LINES:
            await self.db.analyze("batch_lines")
        return batch_record(row)

    async def create_failed_batch(self, spec: BatchSpec, errors: Sequence[BatchError]) -> Batch:
        batch_id = new_id("batch_")
        async with self.db.write() as conn:
            await self._insert_batch(conn, batch_id, spec, "failed")
            row = await conn.fetchrow(
                f"UPDATE batches SET errors = $2 WHERE id = $1 RETURNING {BATCH_COLUMNS}", batch_id, errors_json(errors)
            )
        assert row is not None
        return batch_record(row)

    async def _insert_batch(self, conn: Conn, batch_id: str, spec: BatchSpec, status: str) -> None:
        now = int(self.clock())
        await conn.execute(
            "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, metadata, status,"
            " created_at, expires_at, in_progress_at, failed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            batch_id,
            spec.owner,
            spec.endpoint,
            spec.input_file_id,
            int(spec.completion_window),
            None if spec.metadata is None else orjson.dumps(spec.metadata).decode(),
            status,
            now,
            now + int(spec.completion_window),
            now if status == "in_progress" else None,
            now if status == "failed" else None,
        )

    async def get_batch(self, batch_id: str, owner: OwnerScope) -> Batch | None:
        args: list[object] = [batch_id]
        where = owner_clause(owner, args)
        async with self.db.read() as conn:
            row = await conn.fetchrow(f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1{where}", *args)
        return batch_record(row) if row else None

    async def list_batches(self, owner: OwnerScope, *, limit: int = 20, after: str | None = None) -> Page[Batch]:
        n = page_size(limit)
        args: list[object] = []
        where = "TRUE" + owner_clause(owner, args)
        if after is not None:
            args.append(after)
            where += f" AND seq < (SELECT seq FROM batches WHERE id = ${len(args)})"
        args.append(n + 1)
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE {where} ORDER BY seq DESC LIMIT ${len(args)}"
        async with self.db.read() as conn:
            rows = await conn.fetch(sql, *args)
        return Page([batch_record(r) for r in rows[:n]], has_more=len(rows) > n)

    async def set_batch_status(
        self,
        batch_id: str,
        *,
        expect: Collection[str],
        status: str,
        errors: Sequence[BatchError] | None = None,
    ) -> Batch | None:
        check_statuses([*expect, status])
        if status in FINALIZED_STATUSES:
            raise ValueError(f"a batch becomes {status} through finalize_batch, which writes its result files")
        args: list[object] = [batch_id, status]
        sets = "status = $2"
        if status != "validating":
            args.append(int(self.clock()))
            sets += f", {status}_at = ${len(args)}"
        if errors is not None:
            args.append(errors_json(errors))
            sets += f", errors = ${len(args)}"
        if status in FINAL_STATUSES:
            sets += ", lease_holder = NULL, lease_expires = NULL"
        sql = f"UPDATE batches SET {sets} WHERE id = $1 AND status IN {sql_list(expect)} RETURNING {BATCH_COLUMNS}"
        async with self.db.write() as conn:
            row = await conn.fetchrow(sql, *args)
        return batch_record(row) if row else None

    async def cancel_batch(self, batch_id: str, owner: OwnerScope) -> Batch | None:
        args: list[object] = [batch_id, int(self.clock())]
        where = owner_clause(owner, args)
        async with self.db.write() as conn:
            row = await conn.fetchrow(
                f"UPDATE batches SET status = 'cancelling', cancelling_at = $2 WHERE id = $1{where}"
                f" AND status IN {sql_list(CANCELLABLE_STATUSES)} RETURNING {BATCH_COLUMNS}",
                *args,
            )
        return batch_record(row) if row else await self.get_batch(batch_id, owner)

    async def list_expired_batches(self, limit: int = 100) -> list[Batch]:
        async with self.db.read() as conn:
            rows = await conn.fetch(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE status IN {sql_list(EXPIRABLE_STATUSES)}"
                " AND expires_at <= $1 ORDER BY expires_at, seq LIMIT $2",
                int(self.clock()),
                page_size(limit),
            )
        return [batch_record(r) for r in rows]

    async def acquire_batch_lease(self, holder: str, ttl: float, *, batch_id: str | None = None) -> Batch | None:
        now = self.clock()
        args: list[object] = [holder, now + ttl, now]
        free = f"status IN {sql_list(LEASABLE_STATUSES)} AND (lease_expires IS NULL OR lease_expires < $3)"
        if batch_id is not None:
            args.append(batch_id)
            free += f" AND id = ${len(args)}"
        # The subquery picks (and on PostgreSQL locks, skipping rows another replica is taking);
        # the outer WHERE repeats the test so it is checked again on the row's newest version.
        pick = f"SELECT seq FROM batches WHERE {free} ORDER BY expires_at, seq LIMIT 1{self.db.skip_locked}"
        sql = (
            f"UPDATE batches SET lease_holder = $1, lease_expires = $2 WHERE seq = ({pick}) AND {free}"
            f" RETURNING {BATCH_COLUMNS}"
        )
        async with self.db.write() as conn:
            row = await conn.fetchrow(sql, *args)
        return batch_record(row) if row else None

    async def renew_lease(self, batch_id: str, holder: str, ttl: float) -> bool:
        async with self.db.write() as conn:
            changed = await conn.execute(
                "UPDATE batches SET lease_expires = $3 WHERE id = $1 AND lease_holder = $2",
                batch_id,
                holder,
                self.clock() + ttl,
            )
        return changed == 1

    async def release_lease(self, batch_id: str, holder: str) -> bool:
        async with self.db.write() as conn:
            changed = await conn.execute(
                "UPDATE batches SET lease_holder = NULL, lease_expires = NULL WHERE id = $1 AND lease_holder = $2",
                batch_id,
                holder,
            )
        return changed == 1
