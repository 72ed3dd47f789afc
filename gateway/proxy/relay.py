"""The relay of an engine's answer (gateway/engines/client.py) to the client, whole or streamed.

Streams are relayed chunk by chunk as they arrive, as raw bytes: the relay only cuts at SSE event
boundaries and parses the one event that carries the final usage, and, once [DONE] arrives, the
last events before it for the finish reason (it keeps references to the last blocks, nothing more
per chunk). The client's pace drives the reads (a send must finish before the next upstream
read), so a slow client holds back its own upstream through TCP flow control instead of growing
the gateway's memory; a client that reads nothing for `send_timeout` is dropped by one sweeper
for all streams.

What the relay saw goes into an `Outcome`, which the exchange (gateway/proxy/exchange.py) owns and
accounts for. The relay never sends the final bytes itself: it hands them back, and the exchange
settles the quota before they leave, so a client never sees its answer complete before its
concurrency slot is free.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Send

from gateway.core.errors import Code, GatewayError
from gateway.engines.client import UpstreamError, UpstreamResponse
from gateway.proxy.resume import Transcript

_DONE = b"data: [DONE]"
_DATA = b"data: "
_USAGE = b'"usage":{'
_FINISH = b'"finish_reason"'
_INBAND_ERROR = b'data: {"error"'
_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True, eq=False)
class Outcome:
    """What happened to one request upstream and on the way back."""

    status: int = 0  # the status the client got (or would have got); 0 until known
    usage: dict[str, Any] | None = None  # as the engine reported it
    first_chunk: float = 0.0  # perf_counter of the first streamed bytes
    last_chunk: float = 0.0
    events: int = 0  # SSE data events relayed, [DONE] and the usage event excluded
    done: bool = False  # the upstream finished the stream with [DONE]
    error: str | None = None  # why the upstream broke mid-stream, if it did
    error_code: Code | None = None
    finish_reason: str | None = None  # why the (last) choice ended: stop, length, ...
    sending_since: float = 0.0  # monotonic time the pending send began; 0 when none is pending
    cut: GatewayError | None = None  # the gateway ended it itself (shutdown): what the client is told
    resumed: int = 0  # times the stream went on on another engine after its engine failed


async def error_of(response: UpstreamResponse) -> GatewayError:
    """An engine's refusal before the first byte, as the error the client gets if no other
    engine can take the request: 429 stays a 429 (with retry-after), anything else is a 502."""
    try:
        detail = orjson.loads(await response.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, UpstreamError, TimeoutError):
        detail = f"status {response.status}"
    if response.status == 429:
        return GatewayError(429, f"Every engine is busy: {detail}", code=Code.ENGINES_OVERLOADED)
    return GatewayError(502, f"The engine failed: {detail}", code=Code.UPSTREAM_ERROR)


async def read_whole(response: UpstreamResponse, out: Outcome) -> bytes:
    """A whole answer, read and summed up in `out`; the exchange settles, then sends it."""
    try:
        content = await response.read()
    except TimeoutError:
        raise GatewayError(504, "The engine did not answer in time.", code=Code.UPSTREAM_TIMEOUT) from None
    except UpstreamError as exc:
        raise GatewayError(502, f"The engine failed: {exc}.", code=Code.UPSTREAM_ERROR) from None
    out.status = response.status
    if response.status == 200:
        out.usage, out.finish_reason = _summary_of(content)
    return content


async def relay_stream(
    response: UpstreamResponse,
    send: Send,
    out: Outcome,
    strip_usage: bool,
    on_gap: Callable[[float], None],
    kept: Transcript | None = None,
    splice: Callable[[bytes], bytes] | None = None,
) -> bytes | None:
    """Relays a stream's events (the response has started) up to its last, which it returns
    unsent: the `[DONE]` block. None when the stream broke first (`out.error` says why). The
    exchange settles, then sends the last bytes with `send_last`, so a client never sees its
    answer complete before its concurrency slot is free. With `kept`, every block sent is kept
    for a resume (gateway/proxy/resume.py), and an in-band error event breaks the stream rather
    than reaching the client; `splice` rewrites a continuation's blocks."""
    buf = tail = b""
    # The finish reason sits in the last content event, which may have come a block or two
    # before [DONE] (the usage event comes between): keep references, parse only at the end.
    prev = older = b""
    try:
        while True:
            data = await response.chunk()
            if not data:
                break
            arrived(out, on_gap)
            buf = buf + data if buf else data
            end = _event_end(buf)
            if not end or out.done:
                continue
            block, buf = buf[:end], buf[end:]
            if splice is not None:
                block = splice(block)
            if kept is not None and _INBAND_ERROR in block:
                out.error = "the engine sent an error event"
                return None
            out.events += block.count(b"\n\n") + block.count(b"\r\n\r\n")
            if _USAGE in block:
                block = take_usage(block, out, strip_usage)
            if _DONE in block:
                out.done = True
                out.events -= 1
                out.finish_reason = finish_reason_of((block, prev, older))
                tail = block
            elif block:
                if kept is not None:
                    kept.keep(block)
                await _send(send, out, block)
                older, prev = prev, block
    except (UpstreamError, TimeoutError) as exc:
        if out.cut is None and not out.done:
            out.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if out.done:
        return tail
    if out.cut is None:
        out.error = out.error or "the engine closed the stream before it finished"
    return None


def arrived(out: Outcome, on_gap: Callable[[float], None]) -> None:
    """Notes when a chunk came: the first one's time (the TTFT) or the gap since the last."""
    now = time.perf_counter()
    if out.first_chunk:
        on_gap(now - out.last_chunk)
    else:
        out.first_chunk = now
    out.last_chunk = now


def broken(out: Outcome) -> bytes:
    """The end of a stream that broke (or that the gateway cut at shutdown): the client is told
    in-band, then the stream ends cleanly."""
    if out.cut is not None:
        error = out.cut
    else:
        error = GatewayError(502, f"The upstream engine failed mid-stream ({out.error}).", code=Code.UPSTREAM_ERROR)
    out.status, out.error_code = error.status, error.code
    return error.sse()


async def send_last(send: Send, out: Outcome, tail: bytes) -> None:
    """The stream's last bytes (see `relay_stream`), then its end."""
    if tail:
        await _send(send, out, tail)
    await _send(send, out, b"", more=False)


async def _send(send: Send, out: Outcome, body: bytes, more: bool = True) -> None:
    # A timestamp, not an asyncio.timeout per chunk: the send watchdog sweeps all streams.
    out.sending_since = time.monotonic()
    await send({"type": "http.response.body", "body": body, "more_body": more})
    out.sending_since = 0.0


def _event_end(buf: bytes) -> int:
    """Index just past the last complete SSE event in buf (0 when there is none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def take_usage(block: bytes, out: Outcome, strip: bool) -> bytes:
    """Records the usage event's figures; drops that event when the client did not ask for it."""
    kept = []
    for event in block.split(b"\n\n"):
        if _USAGE in event and event.startswith(_DATA):
            try:
                payload = orjson.loads(event[6:])
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                out.usage = payload["usage"]
                if not payload.get("choices"):
                    out.events -= 1  # a usage-only event carries no tokens
                    if strip:
                        continue
        kept.append(event)
    return b"\n\n".join(kept)


def _summary_of(content: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The usage and the finish reason of a whole answer (parsed once, for both)."""
    try:
        answer = orjson.loads(content)
    except ValueError:
        return None, None
    if not isinstance(answer, dict):
        return None, None
    usage = answer.get("usage")
    return (usage if isinstance(usage, dict) else None), _last_finish(answer)


def finish_reason_of(blocks: tuple[bytes, ...]) -> str | None:
    """The finish reason in the newest event that has one, looking through `blocks` (newest
    first); only events that mention a finish reason are parsed."""
    for block in blocks:
        if _FINISH not in block:
            continue
        for event in reversed(_EVENT_SPLIT.split(block)):
            if _FINISH in event and event.startswith(_DATA):
                try:
                    reason = _last_finish(orjson.loads(event[6:]))
                except ValueError:
                    continue
                if reason is not None:
                    return reason
    return None


def _last_finish(payload: Any) -> str | None:
    """The finish reason of the last choice that has one (n > 1: the last to finish, in a stream)."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list):
        return None
    for choice in reversed(choices):
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str) and reason:
            return reason
    return None


class SendWatchdog:
    """One sweeper for every open stream drops the clients that stopped reading; cheaper than an
    asyncio.timeout around each relayed chunk."""

    def __init__(self, send_timeout: float, interval: float = 1.0) -> None:
        self._streams: dict[Outcome, Callable[[], None]] = {}
        self._timeout = send_timeout
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def watch(self, out: Outcome, drop: Callable[[], None]) -> None:
        self._streams[out] = drop
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sweep(), name="send-watchdog")

    def unwatch(self, out: Outcome) -> None:
        self._streams.pop(out, None)

    async def _sweep(self) -> None:
        while self._streams:
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            for out, drop in list(self._streams.items()):
                if out.sending_since and now - out.sending_since > self._timeout:
                    drop()
