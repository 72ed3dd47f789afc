"""ASGI helpers of the gateway's own: bounded body reads and watching the client while we work.

The gateway shares no code with the engine workers (each deploys alone), so these small pieces
live here rather than in a common package.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway.core.errors import Code, GatewayError, invalid

# orjson reads up to 1024 levels of nesting but writes at most 254, and the body is written again
# (for the engine, in a captured payload, a batch line): deeper than this is a 400 here, not a
# failure later. Counting brackets is a cheap first look; only a body with that many is written
# once, inside enough lists that orjson's own limit falls at MAX_DEPTH (C speed: a Python walk of
# a 4 MB body of small lists would hold the event loop for a second).
MAX_DEPTH = 128
_ORJSON_MAX_DEPTH = 254


class ClientDisconnected(Exception):
    """The client went away: nobody is listening, so nothing is sent."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the limit of {limit} bytes.", code=Code.REQUEST_TOO_LARGE
    )


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit`, so a huge upload
    is never buffered in full. A client that hangs up while sending is ClientDisconnected."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or 400 `invalid_json`. orjson refuses lone surrogates, NaN and
    Infinity; nesting deeper than MAX_DEPTH is refused too: nothing Redis or the store cannot
    hold, nothing that cannot be written again."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}", code=Code.INVALID_JSON) from None
    check_depth(raw, value)
    return value


def check_depth(raw: bytes, value: Any) -> None:
    """A 400 for a JSON body (`raw`, parsed into `value`) nested deeper than MAX_DEPTH levels."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    padded = value
    for _ in range(_ORJSON_MAX_DEPTH - MAX_DEPTH):
        padded = [padded]
    try:
        orjson.dumps(padded)
    except orjson.JSONEncodeError:
        raise invalid(f"The request body nests deeper than {MAX_DEPTH} levels.") from None


def json_object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


class ClientWatch:
    """Watches the ASGI receive channel of a request whose body was read, and cancels the task
    that serves it the moment the client disconnects (or `drop()` gives up on it): that is what
    frees the engine slot at once. Polling `is_disconnected()` between steps would notice late.
    The served task turns the CancelledError into ClientDisconnected with `disconnected(exc)`.

    The watching task starts `WATCH_AFTER` seconds in (a timer is far cheaper than a task): most
    requests to a fast engine are answered before, and a disconnect is still noticed within that
    time of a request that lasts longer (an LLM's answer does), which then frees its engine slot.
    """

    __slots__ = ("_later", "_task", "_watcher", "cut", "gone")

    WATCH_AFTER = 0.05

    def __init__(self) -> None:
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None
        self.gone = False
        self.cut = False

    def start(self, receive: Receive | None) -> None:
        """Watches from now on; with no client (`receive` None: a batch line) there is nothing to
        watch, but the task can still be interrupted at shutdown."""
        self._task = asyncio.current_task()
        if receive is not None:
            self._later = asyncio.get_running_loop().call_later(self.WATCH_AFTER, self._begin, receive)

    def _begin(self, receive: Receive) -> None:
        self._later = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.drop()

    def drop(self) -> None:
        if not self.gone and self._task is not None:
            self.gone = True
            self._task.cancel()

    def interrupt(self) -> None:
        """Cancels the served task for a reason of the gateway's own (shutdown), not a disconnect;
        `interrupted(exc)` takes that cancellation back."""
        if not self.gone and not self.cut and self._task is not None:
            self.cut = True
            self._task.cancel()

    def interrupted(self, exc: BaseException | None) -> bool:
        if self.cut and isinstance(exc, asyncio.CancelledError) and self._task is not None:
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        """Stop watching: call it before the last send of a response, because the server reports
        a finished response as a disconnect too."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def disconnected(self, exc: BaseException | None) -> bool:
        """Whether `exc` means the client went away; a cancellation of this watch's doing is
        taken back (the task goes on to account for the request)."""
        if isinstance(exc, ClientDisconnected):
            return True
        if self.gone and isinstance(exc, asyncio.CancelledError) and self._task is not None:
            self._task.uncancel()
            return True
        return False
