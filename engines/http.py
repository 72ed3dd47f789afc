"""Small HTTP helpers for the worker: bounded body reads, disconnect watching, error responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from engines.errors import EngineError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")
        self.limit = limit


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused (BodyTooLarge) as soon as it is known to exceed `limit`: a huge
    upload is never buffered in full."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request, limit)
    except BodyTooLarge as exc:
        raise EngineError(413, str(exc), code="request_too_large") from None


async def _until_disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work` (after the body was read) and cancels it the moment the client goes away.

    Polling `request.is_disconnected()` would only notice between steps; watching the ASGI
    receive channel notices at once, which is what frees the engine slot at once. The work runs
    in the caller's own task (one helper task, not two), which matters on the hot path.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _until_disconnected(request.receive)
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


def error_response(exc: EngineError) -> JSONResponse:
    headers = {"retry-after": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def on_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    message = {
        404: f"No route for {request.url.path}.",
        405: f"Method {request.method} not allowed here.",
    }.get(status, str(exc.detail))
    return error_response(EngineError(status, message, type="invalid_request_error"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # A bug, not a client mistake: log it with the traceback, answer a clean OpenAI error.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(EngineError(500, "Internal error in the engine worker.", code="internal_error"))
