"""Files (OpenAI Files API) in the SQL store: metadata in `files`, content in 1 MiB `file_parts`.

An upload is written part by part, each part in a transaction of its own, so a 200 MB upload
holds at most two parts in memory and never holds the database's write lock for longer than
one part takes (the client's pace does not stall other writers). Until its last part is in, a
file is `uploading` and invisible; a failed upload removes what it wrote, and one cut short by
a crash is removed by purge_incomplete_uploads.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Literal

from gateway.store.common import SqlBase, new_id, owner_clause, page_size
from gateway.store.db import Conn, Row
from gateway.store.records import (
    FILE_PROCESSED,
    FILE_UPLOADING,
    FileRecord,
    FileTooLargeError,
    Owner,
    OwnerScope,
    Page,
    StoreError,
)

PART_SIZE = 1 << 20
FILE_COLUMNS = "id, owner, purpose, filename, bytes, created_at, status"


class PartWriter:
    """Cuts a byte stream into PART_SIZE parts and hands each to `write_part(number, data)`."""

    def __init__(self, write_part: Callable[[int, bytes], Awaitable[None]], max_bytes: int | None = None) -> None:
        self._write_part = write_part
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._parts = 0
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise FileTooLargeError(self._max_bytes)
        self._buffer += data
        while len(self._buffer) >= PART_SIZE:
            await self._emit(PART_SIZE)

    async def close(self) -> None:
        if self._buffer:
            await self._emit(len(self._buffer))

    async def _emit(self, n: int) -> None:
        part = bytes(self._buffer[:n])
        del self._buffer[:n]
        await self._write_part(self._parts, part)
        self._parts += 1


def file_record(row: Row) -> FileRecord:
    return FileRecord(
        id=row["id"],
        owner=row["owner"],
        purpose=row["purpose"],
        filename=row["filename"],
        bytes=int(row["bytes"]),
        created_at=int(row["created_at"]),
        status=row["status"],
    )


async def insert_file(conn: Conn, record: FileRecord) -> None:
    await conn.execute(
        f"INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        record.id,
        record.owner,
        record.purpose,
        record.filename,
        record.bytes,
        record.created_at,
        record.status,
    )


async def insert_part(conn: Conn, file_id: str, number: int, data: bytes) -> None:
    await conn.execute("INSERT INTO file_parts (file_id, part, data) VALUES ($1, $2, $3)", file_id, number, data)


class FileOps(SqlBase):
    async def create_file(
        self,
        owner: Owner,
        purpose: str,
        filename: str,
        content: AsyncIterable[bytes] | bytes,
        *,
        max_bytes: int | None = None,
    ) -> FileRecord:
        record = FileRecord(new_id("file-"), owner, purpose, filename, 0, int(self.clock()), FILE_UPLOADING)
        async with self.db.write() as conn:
            await insert_file(conn, record)

        async def write_part(number: int, data: bytes) -> None:
            async with self.db.write() as conn:
                await insert_part(conn, record.id, number, data)

        writer = PartWriter(write_part, max_bytes)
        try:
            if isinstance(content, bytes | bytearray | memoryview):
                await writer.write(bytes(content))
            else:
                async for chunk in content:
                    await writer.write(chunk)
            await writer.close()
            async with self.db.write() as conn:
                done = await conn.execute(
                    "UPDATE files SET bytes = $2, status = $3 WHERE id = $1", record.id, writer.size, FILE_PROCESSED
                )
            if not done:
                raise StoreError(f"upload {record.id} was purged before it finished")
        except BaseException:
            await self._remove(record.id)
            raise
        return FileRecord(record.id, owner, purpose, filename, writer.size, record.created_at, FILE_PROCESSED)

    async def get_file(self, file_id: str, owner: OwnerScope) -> FileRecord | None:
        args: list[object] = [file_id, FILE_PROCESSED]
        where = owner_clause(owner, args)
        async with self.db.read() as conn:
            row = await conn.fetchrow(f"SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND status = $2{where}", *args)
        return file_record(row) if row else None

    async def list_files(
        self,
        owner: OwnerScope,
        *,
        purpose: str | None = None,
        limit: int = 10000,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> Page[FileRecord]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        n = page_size(limit)
        args: list[object] = [FILE_PROCESSED]
        where = owner_clause(owner, args)
        if purpose is not None:
            args.append(purpose)
            where += f" AND purpose = ${len(args)}"
        if after is not None:
            args.append(after)
            where += f" AND seq {'<' if order == 'desc' else '>'} (SELECT seq FROM files WHERE id = ${len(args)})"
        args.append(n + 1)
        sql = (
            f"SELECT {FILE_COLUMNS} FROM files WHERE status = $1{where} ORDER BY seq {order.upper()} LIMIT ${len(args)}"
        )
        async with self.db.read() as conn:
            rows = await conn.fetch(sql, *args)
        return Page([file_record(r) for r in rows[:n]], has_more=len(rows) > n)

    async def file_content(self, file_id: str, owner: OwnerScope) -> AsyncIterator[bytes] | None:
        record = await self.get_file(file_id, owner)
        return None if record is None else self._read_parts(record)

    async def _read_parts(self, record: FileRecord) -> AsyncIterator[bytes]:
        # One part per query, no transaction held between them: a slow reader holds nothing.
        number, sent = -1, 0
        while True:
            async with self.db.read() as conn:
                row = await conn.fetchrow(
                    "SELECT part, data FROM file_parts WHERE file_id = $1 AND part > $2 ORDER BY part LIMIT 1",
                    record.id,
                    number,
                )
            if row is None:
                break
            number = int(row["part"])
            data = bytes(row["data"])
            sent += len(data)
            yield data
        if sent != record.bytes:
            raise StoreError(f"file {record.id} was deleted while it was being read")

    async def delete_file(self, file_id: str, owner: OwnerScope) -> bool:
        args: list[object] = [file_id, FILE_PROCESSED]
        where = owner_clause(owner, args)
        async with self.db.write() as conn:
            deleted = await conn.execute(f"DELETE FROM files WHERE id = $1 AND status = $2{where}", *args)
            if deleted:
                await conn.execute("DELETE FROM file_parts WHERE file_id = $1", file_id)
        return bool(deleted)

    async def purge_incomplete_uploads(self, older_than: float) -> int:
        cutoff = int(self.clock() - older_than)
        async with self.db.read() as conn:
            rows = await conn.fetch(
                "SELECT id FROM files WHERE status = $1 AND created_at < $2", FILE_UPLOADING, cutoff
            )
        for row in rows:
            await self._remove(row["id"])
        return len(rows)

    async def _remove(self, file_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute("DELETE FROM file_parts WHERE file_id = $1", file_id)
            await conn.execute("DELETE FROM files WHERE id = $1", file_id)
