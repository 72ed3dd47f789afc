"""The admin console at /ui: the static page and modules shipped in gateway/ui, served with strict headers.

The files are public (they hold no data); every admin API call the page makes carries the admin
key, which the page keeps in the browser's session storage. The Content-Security-Policy allows
only the gateway's own scripts, styles and API: no inline code, no CDN, no web fonts, no framing.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

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


class ConsoleFiles(StaticFiles):
    """StaticFiles (ETags, 304s, HEAD, no path escapes) plus the console's headers."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = MEDIA_TYPES.get(Path(full_path).suffix)
        if media_type is not None and response.status_code != 304:
            response.headers["content-type"] = media_type
        response.headers.update(SECURITY_HEADERS)
        return response


async def _to_index(request: Request) -> Response:
    # The page loads its modules by relative URL, so it must be addressed as a folder. A relative
    # Location also holds behind a proxy that serves the gateway under a path prefix.
    return RedirectResponse("ui/", status_code=308)


def console_routes(directory: Path = UI_DIR) -> list[BaseRoute]:
    """Routes for /ui (a redirect) and /ui/... (the files); add them to the app's routes."""
    return [
        Route("/ui", _to_index, methods=["GET", "HEAD"]),
        Mount("/ui", app=ConsoleFiles(directory=directory, html=True), name="ui"),
    ]
