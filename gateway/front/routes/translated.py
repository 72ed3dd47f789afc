"""What the Responses and Messages routes share: the checks every model request gets (as the
OpenAI routes do them) and one exchange carrying the API's translation."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from gateway.access.base import Principal
from gateway.apis.base import Translation
from gateway.core.request import ApiRequest, Endpoint
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange


def chat_request(
    endpoint: Endpoint, t: Translation, model: str, max_tokens: int | None, subject: str | None, size: int
) -> ApiRequest:
    """The request the gateway schedules, reserves and logs: the translation's chat body (its
    prompt counted as chat's is), labelled with the API it came in as."""
    request = ApiRequest(endpoint, model, t.chat, stream=t.stream, max_tokens=max_tokens, size=size)
    request.subject = subject or None
    return request


async def serve_translated(
    gw: Gateway, principal: Principal, request: ApiRequest, t: Translation, scope: Scope, receive: Receive, send: Send
) -> None:
    async with Exchange(gw, principal, request, scope["request_id"], receive, t) as exchange:
        await exchange.admit()
        response = await exchange.call_engine()
        await exchange.relay(response, send)
