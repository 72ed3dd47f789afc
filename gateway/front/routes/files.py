"""The OpenAI Files API: upload (streamed into the store), list, retrieve, content, delete.

Files belong to the API key that uploaded them (the batch runner's result files to the batch's
owner): another key gets 404, as if the file did not exist. With auth off they belong to no one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.batch.objects import file_object, list_object
from gateway.batch.upload import receive_file
from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.request import header
from gateway.front.params import path_id, query_id
from gateway.proxy.context import Gateway
from gateway.store import FileRecord, Owner, OwnerScope, Store

MAX_FILES_PAGE = 10_000
MAX_DIGITS = 30  # of a number in a query string


def store_of(gw: Gateway) -> Store:
    return gw.store.require()


def file_not_found(file_id: str, param: str = "file_id") -> GatewayError:
    return GatewayError(404, f"No such File object: {file_id}", param=param, code=Code.FILE_NOT_FOUND)


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only (str.isdigit() also takes "²", which int() refuses), and few of them:
    # int() refuses more than 4,300
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_DIGITS or not low <= int(raw) <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return int(raw)


def content_response(record: FileRecord, parts: AsyncIterator[bytes]) -> Response:
    # Header values are latin-1: an ASCII fallback, and the exact name in RFC 6266's filename*.
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in record.filename)
    headers = {
        "content-length": str(record.bytes),
        "content-disposition": f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(record.filename)}",
    }
    return StreamingResponse(parts, media_type="application/octet-stream", headers=headers)


class FileRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
        ]

    async def _owner(self, request: Request) -> Owner:
        return (await self.gw.access.authenticate(request.scope)).key_id

    async def upload(self, request: Request) -> Response:
        owner = await self._owner(request)
        length = header(request.scope, b"content-length")
        record = await receive_file(
            store_of(self.gw),
            owner,
            request.stream(),
            header(request.scope, b"content-type"),
            int(length) if length is not None and length.isdigit() else None,
            self.gw.settings.files.max_bytes,
        )
        return JSONResponse(file_object(record))

    async def list_files(self, request: Request) -> Response:
        owner = await self._owner(request)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("'order' must be asc or desc.", param="order")
        page = await store_of(self.gw).list_files(
            owner,
            purpose=query_id(request, "purpose"),
            limit=int_param(request, "limit", MAX_FILES_PAGE, 1, MAX_FILES_PAGE),
            after=query_id(request, "after"),
            order="asc" if order == "asc" else "desc",
        )
        return JSONResponse(list_object([file_object(f) for f in page.items], page.has_more))

    async def get_file(self, request: Request) -> Response:
        file_id = path_id(request, "file_id")
        record = await store_of(self.gw).get_file(file_id, await self._owner(request))
        if record is None:
            raise file_not_found(file_id)
        return JSONResponse(file_object(record))

    async def delete_file(self, request: Request) -> Response:
        file_id = path_id(request, "file_id")
        if not await store_of(self.gw).delete_file(file_id, await self._owner(request)):
            raise file_not_found(file_id)
        body: dict[str, Any] = {"id": file_id, "object": "file", "deleted": True}
        return JSONResponse(body)

    async def content(self, request: Request) -> Response:
        return await file_content(self.gw, path_id(request, "file_id"), await self._owner(request))


async def file_content(gw: Gateway, file_id: str, owner: OwnerScope) -> Response:
    store = store_of(gw)
    record = await store.get_file(file_id, owner)
    parts = await store.file_content(file_id, owner) if record is not None else None
    if record is None or parts is None:
        raise file_not_found(file_id)
    return content_response(record, parts)
