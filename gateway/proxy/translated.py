"""The relay of an answer that a translation (gateway/apis/) rewrites on the way: the Responses
and Messages APIs. Beside relay.py, whose raw-bytes path for chat stays untouched.

Same contract as relay.py: the client's pace drives the reads, the last bytes are handed back
unsent (the exchange settles before they leave), and a stream that breaks ends in-band, here with
the API's own error event. The translation reads the usage and finish reason (a translated stream
parses every chunk anyway; a native one only its final events) and they go into the Outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Send

from gateway.apis.base import Translation
from gateway.core.errors import Code, GatewayError
from gateway.engines.client import UpstreamError, UpstreamResponse
from gateway.proxy.relay import SSE_HEADERS, Outcome, _event_end, _send, arrived

JSON = (b"content-type", b"application/json")


def _settled(t: Translation, out: Outcome) -> None:
    out.usage, out.finish_reason = t.usage, t.finish_reason
    out.events = t.events


async def read_translated_whole(response: UpstreamResponse, out: Outcome, t: Translation) -> bytes:
    """The whole answer, rewritten into the API's own shape; the exchange settles, then sends it."""
    try:
        content = await response.read()
    except TimeoutError:
        raise GatewayError(504, "The engine did not answer in time.", code=Code.UPSTREAM_TIMEOUT) from None
    except UpstreamError as exc:
        raise GatewayError(502, f"The engine failed: {exc}.", code=Code.UPSTREAM_ERROR) from None
    out.status = response.status
    body = t.whole(response.status, content)
    _settled(t, out)
    return body


async def relay_translated_stream(
    response: UpstreamResponse,
    send: Send,
    out: Outcome,
    headers: list[tuple[bytes, bytes]],
    t: Translation,
    on_gap: Callable[[float], None],
) -> bytes:
    """Relays a stream's events, rewritten, up to its last, which it returns unsent: the API's
    closing events, or its error event when the stream broke (`out.done` says which). The
    exchange settles, then sends them with `send_last`, as for a chat stream."""
    out.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
    opening = t.open()
    if opening:
        await _send(send, out, opening)
    buf = tail = b""
    try:
        while True:
            data = await response.chunk()
            if not data:
                break
            arrived(out, on_gap)
            buf = buf + data if buf else data
            end = _event_end(buf)
            if not end:
                continue
            block, buf = buf[:end], buf[end:]
            block = t.feed(block)
            if out.done:  # what an engine sends after its last event waits behind it
                tail += block
            elif t.done:
                out.done = True
                _settled(t, out)
                tail = block
            elif block:
                await _send(send, out, block)
    except (UpstreamError, TimeoutError) as exc:
        if out.cut is None and not out.done:
            out.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if out.done:
        return tail
    if out.cut is not None:
        error = out.cut
    else:
        out.error = out.error or "the engine closed the stream before it finished"
        error = GatewayError(502, f"The upstream engine failed mid-stream ({out.error}).", code=Code.UPSTREAM_ERROR)
    out.status, out.error_code = error.status, error.code
    _settled(t, out)
    return t.failed(error)
