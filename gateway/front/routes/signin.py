"""Single sign-on for the console: /ui/auth/login (to the provider, with PKCE), /ui/auth/callback
(the code -> a session cookie), /ui/auth/logout, /ui/auth/me (who is signed in, and the CSRF token
the console sends with every change)."""

from __future__ import annotations

import html
import logging

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import client_address
from gateway.access.oidc import OidcError
from gateway.access.sessions import COOKIE, OidcSignIn

log = logging.getLogger(__name__)

# After the provider's redirect the browser treats the next navigation as cross-site, and a
# SameSite=Strict cookie would not go with it: a page of ours moves on instead (same-site).
_SIGNED_IN = """<!doctype html><meta charset="utf-8"><title>Signed in</title>
<meta http-equiv="refresh" content="0;url=/ui/"><p>Signed in. <a href="/ui/">Continue to the console</a>.</p>"""


class SignInRoutes:
    def __init__(self, sign_in: OidcSignIn) -> None:
        self._sign_in = sign_in
        self._settings = sign_in.settings

    def routes(self) -> list[Route]:
        return [
            Route("/ui/auth/login", self.login, methods=["GET"]),
            Route("/ui/auth/callback", self.callback, methods=["GET"]),
            Route("/ui/auth/logout", self.logout, methods=["POST"]),
            Route("/ui/auth/me", self.me, methods=["GET"]),
        ]

    def _redirect_url(self, request: Request) -> str:
        if self._settings.redirect_url:
            return self._settings.redirect_url
        return str(request.url.replace(path="/ui/auth/callback", query=""))

    async def login(self, request: Request) -> Response:
        try:
            url = await self._sign_in.begin(self._redirect_url(request))
        except OidcError as exc:
            return _failed(str(exc), 502)
        return RedirectResponse(url, status_code=302)

    async def callback(self, request: Request) -> Response:
        q = request.query_params
        if "error" in q:
            return _failed(f"the provider refused the sign-in ({q['error'][:100]})", 401)
        try:
            sid, actor = await self._sign_in.finish(
                q.get("state", ""), q.get("code", ""), client_address(request.scope)
            )
        except OidcError as exc:
            return _failed(str(exc), 401)
        log.info("console sign-in: %s as %s", actor.subject, actor.role)
        response = HTMLResponse(_SIGNED_IN)
        response.set_cookie(
            COOKIE,
            sid,
            max_age=int(self._settings.session_ttl),
            path="/",
            httponly=True,
            # behind a TLS-terminating proxy the request is plain HTTP: an https redirect_url says so
            secure=request.url.scheme == "https" or (self._settings.redirect_url or "").startswith("https://"),
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        await self._sign_in.session_actor(request.scope)  # a POST: checks the CSRF token
        await self._sign_in.end(request.scope)
        response = JSONResponse({"signed_in": False})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def me(self, request: Request) -> Response:
        found = await self._sign_in.session(request.scope)
        if found is None:
            return JSONResponse({"signed_in": False, "sso": True})
        actor = await self._sign_in.session_actor(request.scope)
        assert actor is not None
        return JSONResponse(
            {
                "signed_in": True,
                "sso": True,
                "subject": actor.subject,
                "role": actor.role,
                "teams": sorted(actor.teams),
                "csrf": found.get("csrf"),
            }
        )


def _failed(why: str, status: int) -> HTMLResponse:
    body = f'<!doctype html><meta charset="utf-8"><title>Sign-in failed</title><p>Sign-in failed: {html.escape(why)}.</p><p><a href="/ui/">Back</a></p>'
    return HTMLResponse(body, status_code=status)
