"""Stored Responses API answers (`store: true`) in the SQL store: the response object and its
input, as JSON text, owned by the API key that made them; deleted by id or by retention."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.store.common import SqlBase, owner_clause
from gateway.store.records import Owner, OwnerScope, StoredResponse


class ResponseOps(SqlBase):
    async def save_response(
        self, response_id: str, owner: Owner, response: dict[str, Any], input_items: list[dict[str, Any]]
    ) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO responses (id, owner, created_at, response, input_items) VALUES ($1, $2, $3, $4, $5)",
                response_id,
                owner,
                self.clock(),
                orjson.dumps(response).decode(),
                orjson.dumps(input_items).decode(),
            )

    async def get_response(self, response_id: str, owner: OwnerScope) -> StoredResponse | None:
        args: list[Any] = [response_id]
        where = owner_clause(owner, args)
        async with self.db.read() as conn:
            row = await conn.fetchrow(
                f"SELECT id, owner, created_at, response, input_items FROM responses WHERE id = $1{where}", *args
            )
        if row is None:
            return None
        return StoredResponse(
            row["id"],
            row["owner"],
            float(row["created_at"]),
            orjson.loads(row["response"]),
            orjson.loads(row["input_items"]),
        )

    async def delete_response(self, response_id: str, owner: OwnerScope) -> bool:
        args: list[Any] = [response_id]
        where = owner_clause(owner, args)
        async with self.db.write() as conn:
            return await conn.execute(f"DELETE FROM responses WHERE id = $1{where}", *args) > 0

    async def delete_responses_before(self, cutoff: float) -> int:
        async with self.db.write() as conn:
            return await conn.execute("DELETE FROM responses WHERE created_at < $1", cutoff)
