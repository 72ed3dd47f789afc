"""Batch lines in the SQL store: claims and results, the part that makes every line run to
exactly one recorded outcome whatever replica dies on the way.

A line is `pending`, `claimed` (by a holder, with a token and an expiry), then `done` or
`failed`. A claim takes pending lines and lines whose claim expired (their runner died), so a
line in flight on a dead replica runs again. A result is written only while the line is still
claimed under the token that came with the claim: once a line was claimed again, or failed by
expiry or cancel, the old runner's late result is refused. The batch's counts move in the same
transaction as the line, so they stay exact, and so does the spend the result carries (what its
run was charged): a line counts in the spend rollups once, with the result that was written.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Collection, Sequence

import orjson

from gateway.store.common import SqlBase, page_size, sql_list
from gateway.store.records import ClaimedLine, LineOutcome, SpendRow
from gateway.store.spend import add_spend_rows

UNFINISHED = ("pending", "claimed")


class LineOps(SqlBase):
    async def claim_lines(self, batch_id: str, holder: str, n: int, claim_ttl: float) -> list[ClaimedLine]:
        now = self.clock()
        token = secrets.token_hex(16)
        claimable = f"batch_id = $1 AND state IN {sql_list(UNFINISHED)} AND (state = 'pending' OR claim_expires < $5)"
        # Only while the batch runs: a cancel (or expiry) stops new lines at once.
        running = "EXISTS (SELECT 1 FROM batches WHERE id = $1 AND status = 'in_progress')"
        pick = (
            f"SELECT line FROM batch_lines WHERE {claimable} AND {running} ORDER BY line LIMIT $6{self.db.skip_locked}"
        )
        sql = (
            "UPDATE batch_lines SET state = 'claimed', claim_holder = $2, claim_token = $3, claim_expires = $4,"
            f" attempts = attempts + 1 WHERE batch_id = $1 AND line {self.db.in_subquery(pick)} AND {claimable}"
            " RETURNING line, custom_id, body, attempts"
        )
        async with self.db.write() as conn:
            rows = await conn.fetch(sql, batch_id, holder, token, now + claim_ttl, now, page_size(n))
        claimed = [
            ClaimedLine(batch_id, int(r["line"]), r["custom_id"], r["body"], int(r["attempts"]), token) for r in rows
        ]
        return sorted(claimed, key=lambda c: c.line)

    async def extend_claims(self, batch_id: str, claim_tokens: Collection[str], claim_ttl: float) -> int:
        if not claim_tokens:
            return 0
        tokens = list(claim_tokens)
        marks = ", ".join(f"${i}" for i in range(3, len(tokens) + 3))
        async with self.db.write() as conn:
            return await conn.execute(
                "UPDATE batch_lines SET claim_expires = $2"
                f" WHERE batch_id = $1 AND state = 'claimed' AND claim_token IN ({marks})",
                batch_id,
                self.clock() + claim_ttl,
                *tokens,
            )

    async def record_result(self, batch_id: str, line: int, claim_token: str, outcome: LineOutcome) -> bool:
        [written] = await self._record([(batch_id, line, claim_token, outcome)])
        return written

    async def record_results(self, results: Sequence[tuple[ClaimedLine, LineOutcome]]) -> list[bool]:
        return await self._record([(c.batch_id, c.line, c.claim_token, outcome) for c, outcome in results])

    async def _record(self, results: Sequence[tuple[str, int, str, LineOutcome]]) -> list[bool]:
        if not results:
            return []
        for _, _, _, outcome in results:
            if outcome.body is not None:
                orjson.loads(outcome.body)  # the result files embed it as it is: it must be JSON
            if not outcome.failed and outcome.status_code is None:
                raise ValueError("a successful outcome needs its status_code")
        written: list[bool] = []
        counts: Counter[tuple[str, str]] = Counter()
        spend: list[SpendRow] = []
        now = self.clock()
        async with self.db.write() as conn:
            for batch_id, line, token, outcome in results:
                state = "failed" if outcome.failed else "done"
                changed = await conn.execute(
                    "UPDATE batch_lines SET state = $4, status_code = $5, request_id = $6, response = $7,"
                    " error_code = $8, error_message = $9, finished_at = $10"
                    " WHERE batch_id = $1 AND line = $2 AND state = 'claimed' AND claim_token = $3",
                    batch_id,
                    line,
                    token,
                    state,
                    outcome.status_code,
                    outcome.request_id,
                    outcome.body,
                    outcome.error_code,
                    outcome.error_message,
                    now,
                )
                written.append(changed == 1)
                if changed:
                    counts[batch_id, "failed_count" if outcome.failed else "completed_count"] += 1
                    if outcome.spend is not None:
                        spend.append(outcome.spend)
            for (batch_id, column), n in sorted(counts.items()):
                await conn.execute(f"UPDATE batches SET {column} = {column} + $2 WHERE id = $1", batch_id, n)
            await add_spend_rows(conn, spend)
        return written

    async def fail_pending(self, batch_id: str, code: str, message: str) -> int:
        async with self.db.write() as conn:
            failed = await conn.execute(
                "UPDATE batch_lines SET state = 'failed', error_code = $2, error_message = $3, finished_at = $4"
                f" WHERE batch_id = $1 AND state IN {sql_list(UNFINISHED)}",
                batch_id,
                code,
                message,
                self.clock(),
            )
            if failed:
                await conn.execute(
                    "UPDATE batches SET failed_count = failed_count + $2 WHERE id = $1", batch_id, failed
                )
        return failed

    async def count_claimed(self, batch_id: str) -> int:
        async with self.db.read() as conn:
            # The IN repeats the partial index's condition, so the count walks only unfinished lines.
            row = await conn.fetchrow(
                "SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = $1 AND state IN ('pending', 'claimed')"
                " AND state = 'claimed'",
                batch_id,
            )
        return int(row["n"]) if row else 0
