"""vLLM's speech endpoints passed through with keys and quotas: `/v1/audio/transcriptions` and
`/v1/audio/translations`, multipart uploads under the body-size bound.

The upload is read whole (bounded by `server.max_body_bytes`, as every body is), its `model`
field read to route it, and rewritten to the route's upstream model for the engine; every other
part goes through byte for byte. Only engines that serve audio (`apis: [audio]`; vLLM does) can
take it.
"""

from __future__ import annotations

import re

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.apis.checks import MAX_NAME
from gateway.core.errors import invalid
from gateway.core.request import ApiRequest, Endpoint, header, read_body
from gateway.front.routes.openai import check_model
from gateway.front.routes.passthrough import not_served, served_by
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange

_BOUNDARY = re.compile(rb'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_NAME = re.compile(rb'content-disposition:[^\r\n]*;\s*name="([^"]*)"', re.IGNORECASE)


class Multipart:
    """A multipart/form-data body cut at its boundaries, enough to read and rewrite one field."""

    def __init__(self, raw: bytes, content_type: bytes) -> None:
        if not content_type.lower().startswith(b"multipart/form-data"):
            raise invalid("The body must be multipart/form-data (a file and its fields).")
        found = _BOUNDARY.search(content_type)
        if found is None:
            raise invalid("The multipart content type names no boundary.")
        self.delimiter = b"--" + found.group(1)
        self.parts = raw.split(self.delimiter)
        if len(self.parts) < 3 or not self.parts[-1].startswith(b"--"):
            raise invalid("The multipart body is not complete.")

    def _find(self, name: str) -> int | None:
        wanted = name.encode()
        for i, part in enumerate(self.parts[1:-1], 1):
            head = part.split(b"\r\n\r\n", 1)[0]
            match = _NAME.search(head)
            if match is not None and match.group(1) == wanted:
                return i
        return None

    def field(self, name: str) -> str | None:
        i = self._find(name)
        if i is None:
            return None
        _, _, value = self.parts[i].partition(b"\r\n\r\n")
        try:
            return value.removesuffix(b"\r\n").decode()
        except UnicodeDecodeError:
            return None

    def with_field(self, name: str, value: str) -> bytes:
        i = self._find(name)
        parts = list(self.parts)
        if i is not None:
            head, _, _ = parts[i].partition(b"\r\n\r\n")
            parts[i] = head + b"\r\n\r\n" + value.encode() + b"\r\n"
        return self.delimiter.join(parts)


class AudioEndpoint:
    def __init__(self, gw: Gateway, path: str, api: str) -> None:
        self.gw = gw
        self.endpoint = Endpoint(path, api, "prompt", False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        principal = await gw.access.authenticate(scope)
        raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
        content_type = header(scope, b"content-type") or b""
        form = Multipart(raw, content_type)
        model = form.field("model")
        if not model or len(model) > MAX_NAME:
            raise invalid(f"'model' is required: a form field of 1 to {MAX_NAME} characters.", param="model")
        request = ApiRequest(self.endpoint, model, {"model": model}, size=len(raw))
        request.content_type = content_type
        request.rewrite = lambda upstream: form.with_field("model", upstream)
        check_model(gw, principal, request)
        if not served_by(gw, model, "audio"):
            raise not_served(model, self.endpoint.path)
        async with Exchange(gw, principal, request, scope["request_id"], receive) as exchange:
            await exchange.admit()
            response = await exchange.call_engine()
            await exchange.relay(response, send)


def audio_routes(gw: Gateway) -> list[Route]:
    return [
        Route(
            "/v1/audio/transcriptions", AudioEndpoint(gw, "/v1/audio/transcriptions", "transcription"), methods=["POST"]
        ),
        Route("/v1/audio/translations", AudioEndpoint(gw, "/v1/audio/translations", "translation"), methods=["POST"]),
    ]
