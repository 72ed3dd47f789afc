"""The admin console at /ui: the static page and modules shipped in gateway/ui, served with strict headers.

The files are public (they hold no data); every admin API call the page makes carries the admin
key, which the page keeps in the browser's session storage. The Content-Security-Policy allows
only the gateway's own scripts, styles and API: no inline code, no CDN, no web fonts, no framing.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Message, Receive, Scope, Send

from gateway.core.errors import Code, GatewayError

UI_DIR = Path(__file__).resolve().parents[2] / "ui"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",  # forms are handled by script, never submitted
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    # The file names carry no version, so the browser revalidates each file (ETag, then 304):
    # an upgraded gateway never runs a stale mix of old and new modules.
    "cache-control": "no-cache",
}

# Fixed here rather than guessed from the host's MIME tables: with nosniff, a module served
# with a wrong type does not run.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}


SECURITY_RAW = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class ConsoleFiles(StaticFiles):
    """StaticFiles (ETags, 304s, HEAD, no path escapes) plus the console's headers on every answer,
    errors and redirects included, and no URL built from the client's Host header."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()), *(h for h in SECURITY_RAW if h[0] not in own)]
            await send(message)

        try:
            await super().__call__(scope, receive, secured)
        except HTTPException as exc:
            error = (
                GatewayError(405, "The console's files are read with GET or HEAD.", code=Code.METHOD_NOT_ALLOWED)
                if exc.status_code == 405
                else GatewayError(404, "No such file in the console.", code=Code.ROUTE_NOT_FOUND)
            )
            await secured({"type": "http.response.start", "status": error.status, "headers": error.raw_headers()})
            await secured({"type": "http.response.body", "body": error.payload()})

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if isinstance(response, RedirectResponse):
            # StaticFiles sends a folder's URL without its slash to an absolute URL built from the
            # Host header (`Host: evil.example` -> http://evil.example/ui/./). The same folder by
            # a relative reference: its last segment plus the slash, resolved by the client.
            last = scope["path"].rsplit("/", 1)[-1]
            return RedirectResponse(quote(last) + "/", status_code=response.status_code)
        return response

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = MEDIA_TYPES.get(Path(full_path).suffix)
        if media_type is not None and response.status_code != 304:
            response.headers["content-type"] = media_type
        return response


async def _to_index(request: Request) -> Response:
    # The page loads its modules by relative URL, so it must be addressed as a folder. A relative
    # Location also holds behind a proxy that serves the gateway under a path prefix.
    if request.method not in ("GET", "HEAD"):
        error = GatewayError(405, "The console's files are read with GET or HEAD.", code=Code.METHOD_NOT_ALLOWED)
        headers = {**SECURITY_HEADERS, "allow": "GET, HEAD"}
        return Response(error.payload(), 405, headers=headers, media_type="application/json")
    return RedirectResponse("ui/", status_code=308, headers=SECURITY_HEADERS)


def console_routes(directory: Path = UI_DIR) -> list[BaseRoute]:
    """Routes for /ui (a redirect) and /ui/... (the files); add them to the app's routes."""
    return [
        # every method: a 405 here carries the console's headers too
        Route("/ui", _to_index, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        Mount("/ui", app=ConsoleFiles(directory=directory, html=True), name="ui"),
    ]
