"""Finishing a batch: its output and error files, and its final status, in one transaction.

The lines are read in pages in line order and rendered as OpenAI renders them, each done line
to the output file and each failed one to the error file, through part writers: memory stays
bounded whatever the batch's size. Everything (both files, the batch's file ids, its status)
commits together or not at all, and the status is compare-and-set, so a finalize that crashed
is simply run again and two replicas racing produce one pair of files: every custom_id lands
exactly once, in exactly one of the two files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any

import orjson

from gateway.store.batches import BATCH_COLUMNS, FINALIZED_STATUSES, batch_record, check_statuses
from gateway.store.common import SqlBase, new_id
from gateway.store.db import Conn, Row
from gateway.store.files import PartWriter, insert_file, insert_part
from gateway.store.records import FILE_PROCESSED, Batch, FileRecord, UnfinishedLinesError

PAGE_LINES = 1000
OUTPUT_PURPOSE = "batch_output"


def request_line_id(batch_id: str, line: int) -> str:
    """The `id` of a line in the result files: stable, so a re-run finalize writes the same."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def render_line(batch_id: str, row: Row) -> bytes:
    response: dict[str, Any] | None = None
    if row["status_code"] is not None:
        body = orjson.Fragment(row["response"]) if row["response"] is not None else None
        response = {"status_code": row["status_code"], "request_id": row["request_id"], "body": body}
    error = None if row["state"] == "done" else {"code": row["error_code"], "message": row["error_message"]}
    line = {
        "id": request_line_id(batch_id, row["line"]),
        "custom_id": row["custom_id"],
        "response": response,
        "error": error,
    }
    return orjson.dumps(line) + b"\n"


class _ResultFile:
    def __init__(self, conn: Conn, batch_id: str, kind: str) -> None:
        self.id = new_id("file-")
        self.filename = f"{batch_id}_{kind}.jsonl"

        async def write_part(number: int, data: bytes) -> None:
            await insert_part(conn, self.id, number, data)

        self.writer = PartWriter(write_part)


class FinalizeOps(SqlBase):
    async def finalize_batch(self, batch_id: str, *, expect: Collection[str], status: str) -> Batch | None:
        check_statuses([*expect, status])
        if status not in FINALIZED_STATUSES:
            raise ValueError(f"finalize_batch ends a batch as one of {FINALIZED_STATUSES}, not {status!r}")
        async with self.db.write() as conn:
            batch = await conn.fetchrow(
                f"SELECT owner, status FROM batches WHERE id = $1{self.db.for_update}", batch_id
            )
            if batch is None or batch["status"] not in expect:
                return None
            unfinished = await conn.fetchrow(
                "SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = $1 AND state IN ('pending', 'claimed')",
                batch_id,
            )
            if unfinished and unfinished["n"]:
                raise UnfinishedLinesError(batch_id, int(unfinished["n"]))
            output = _ResultFile(conn, batch_id, "output")
            errors = _ResultFile(conn, batch_id, "error")
            last = 0
            while True:
                rows = await conn.fetch(
                    "SELECT line, custom_id, state, status_code, request_id, response, error_code, error_message"
                    " FROM batch_lines WHERE batch_id = $1 AND line > $2 ORDER BY line LIMIT $3",
                    batch_id,
                    last,
                    PAGE_LINES,
                )
                if not rows:
                    break
                for row in rows:
                    target = output if row["state"] == "done" else errors
                    await target.writer.write(render_line(batch_id, row))
                last = int(rows[-1]["line"])
            now = int(self.clock())
            file_ids: list[str | None] = []
            for result in (output, errors):
                await result.writer.close()
                if result.writer.size == 0:  # as OpenAI: no file rather than an empty one
                    file_ids.append(None)
                    continue
                record = FileRecord(
                    result.id, batch["owner"], OUTPUT_PURPOSE, result.filename, result.writer.size, now, FILE_PROCESSED
                )
                await insert_file(conn, record)
                file_ids.append(result.id)
            updated = await conn.fetchrow(
                f"UPDATE batches SET status = $2, {status}_at = $3, output_file_id = $4, error_file_id = $5,"
                f" lease_holder = NULL, lease_expires = NULL WHERE id = $1 RETURNING {BATCH_COLUMNS}",
                batch_id,
                status,
                now,
                file_ids[0],
                file_ids[1],
            )
        assert updated is not None
        return batch_record(updated)
