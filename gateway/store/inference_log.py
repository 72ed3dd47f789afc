"""The inference log in the SQL store: one row per request, appended in batches by a background
writer (COPY on PostgreSQL, executemany on SQLite), paged newest first for the admin API, read
per model and time window for reports, and trimmed by retention.

Pages use `seq`, which only grows: rows written while someone pages through the log appear
before the first page and never shift the pages after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from gateway.store.common import SqlBase, newest_first
from gateway.store.db import Row
from gateway.store.records import InferenceRecord, Page, ReportRow, RequestFilter

REQUEST_COLUMNS = (
    "time",
    "request_id",
    "key_id",
    "model",
    "route",
    "engine",
    "status",
    "error_code",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "ttft",
    "duration",
    "finish_reason",
    "client_disconnect",
    "batch_id",
    "payload",
    "api",
)
REPORT_COLUMNS = "time, route, status, ttft, duration, prompt_tokens, completion_tokens, finish_reason"
REPORT_PAGE = 5000
DELETE_CHUNK = 10000


def _values(r: InferenceRecord) -> tuple[object, ...]:
    # Exact Python types: COPY's binary format takes no implicit conversions.
    return (
        float(r.time),
        r.request_id,
        r.key_id,
        r.model,
        r.route,
        r.engine,
        int(r.status),
        r.error_code,
        bool(r.stream),
        int(r.prompt_tokens),
        int(r.completion_tokens),
        None if r.ttft is None else float(r.ttft),
        float(r.duration),
        r.finish_reason,
        bool(r.client_disconnect),
        r.batch_id,
        r.payload,
        r.api,
    )


def _record(row: Row) -> InferenceRecord:
    return InferenceRecord(
        time=float(row["time"]),
        request_id=row["request_id"],
        key_id=row["key_id"],
        model=row["model"],
        route=row["route"],
        engine=row["engine"],
        status=int(row["status"]),
        error_code=row["error_code"],
        stream=bool(row["stream"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        ttft=None if row["ttft"] is None else float(row["ttft"]),
        duration=float(row["duration"]),
        finish_reason=row["finish_reason"],
        client_disconnect=bool(row["client_disconnect"]),
        batch_id=row["batch_id"],
        payload=row["payload"],
        id=int(row["seq"]),
        api=row["api"],
    )


class InferenceLogOps(SqlBase):
    async def append_requests(self, rows: Sequence[InferenceRecord]) -> None:
        if not rows:
            return
        async with self.db.write() as conn:
            await conn.insert_rows("requests", REQUEST_COLUMNS, [_values(r) for r in rows])

    async def query_requests(
        self, where: RequestFilter, *, limit: int = 100, after: int | None = None
    ) -> Page[InferenceRecord]:
        equal = (
            ("key_id", where.key_id),
            ("model", where.model),
            ("route", where.route),
            ("status", None if where.status is None else int(where.status)),
            ("api", where.api),
        )
        rows, more = await newest_first(
            self.db, "requests", REQUEST_COLUMNS, limit, equal, since=where.since, until=where.until, after=after
        )
        return Page([_record(r) for r in rows], has_more=more)

    async def report_rows(self, model: str, since: float, until: float) -> AsyncIterator[ReportRow]:
        # Keyset pages on (time, seq), which the (model, time, seq) index serves in order.
        last_time, last_seq = float("-inf"), -1
        since, until = float(since), float(until)
        while True:
            async with self.db.read() as conn:
                rows = await conn.fetch(
                    f"SELECT seq, {REPORT_COLUMNS} FROM requests WHERE model = $1 AND time >= $2 AND time < $3"
                    " AND (time > $4 OR (time = $4 AND seq > $5)) ORDER BY time, seq LIMIT $6",
                    model,
                    since,
                    until,
                    max(last_time, since),
                    last_seq,
                    REPORT_PAGE,
                )
            for r in rows:
                yield ReportRow(
                    float(r["time"]),
                    r["route"],
                    int(r["status"]),
                    None if r["ttft"] is None else float(r["ttft"]),
                    float(r["duration"]),
                    int(r["prompt_tokens"]),
                    int(r["completion_tokens"]),
                    r["finish_reason"],
                )
            if len(rows) < REPORT_PAGE:
                return
            last_time, last_seq = float(rows[-1]["time"]), int(rows[-1]["seq"])

    async def delete_requests_before(self, cutoff: float) -> int:
        # In chunks: one huge DELETE would hold SQLite's write lock (and bloat one PostgreSQL
        # transaction) for as long as it takes.
        total = 0
        oldest = f"SELECT seq FROM requests WHERE time < $1 ORDER BY time LIMIT {DELETE_CHUNK}"
        while True:
            async with self.db.write() as conn:
                deleted = await conn.execute(
                    f"DELETE FROM requests WHERE seq {self.db.in_subquery(oldest)}", float(cutoff)
                )
            total += deleted
            if deleted < DELETE_CHUNK:
                return total
