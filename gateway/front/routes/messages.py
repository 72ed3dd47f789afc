"""Anthropic's Messages API: `POST /v1/messages` (through the exchange, translated to chat
completions or native, gateway/apis/messages.py) and `POST /v1/messages/count_tokens`.

The key comes as Anthropic's clients send it, in `x-api-key`, or as a bearer token;
`anthropic-version` is accepted whatever it says. Every error on these paths, the gateway's own
refusals included, takes Anthropic's shape (the middleware writes what the error says).
"""

from __future__ import annotations

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.access.tokens import PromptCounter
from gateway.apis.messages import MessagesTranslation, anthropic
from gateway.apis.messages_input import parse_messages
from gateway.core.errors import GatewayError
from gateway.core.request import MESSAGES, header, json_object, read_body
from gateway.front.routes.openai import check_model
from gateway.front.routes.translated import chat_request, serve_translated
from gateway.proxy.context import Gateway


def with_bearer(scope: Scope) -> Scope:
    """Anthropic's `x-api-key` as the bearer token the gateway's auth reads."""
    if header(scope, b"authorization") is not None:
        return scope
    key = header(scope, b"x-api-key")
    if key is None:
        return scope
    return {**scope, "headers": [*scope["headers"], (b"authorization", b"Bearer " + key)]}


class MessagesEndpoint:
    def __init__(self, gw: Gateway, counting: bool = False) -> None:
        self.gw = gw
        self.counting = counting
        self._counter: PromptCounter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(with_bearer(scope), receive, send)
        except GatewayError as exc:
            raise anthropic(exc) from None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        principal = await gw.access.authenticate(scope)
        raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
        parsed = parse_messages(json_object(raw), counting=self.counting)
        t = MessagesTranslation(parsed)
        request = chat_request(MESSAGES, t, parsed.model, parsed.max_tokens, parsed.user, len(raw))
        check_model(gw, principal, request)
        if self.counting:
            await self._count(parsed.model, t.chat, send)
            return
        await serve_translated(gw, principal, request, t, scope, receive, send)

    async def _count(self, model: str, chat: dict[str, object], send: Send) -> None:
        """The prompt's tokens as the gateway reserves them (the model's tokenizer and chat
        template where configured, else an estimate); no engine is asked."""
        if self._counter is None:
            self._counter = PromptCounter({m.name: m.tokenizer for m in self.gw.settings.models})
        tokens = self._counter.count_body(model, chat)
        body = b'{"input_tokens":%d}' % tokens
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def messages_routes(gw: Gateway) -> list[Route]:
    return [
        Route("/v1/messages", MessagesEndpoint(gw), methods=["POST"]),
        Route("/v1/messages/count_tokens", MessagesEndpoint(gw, counting=True), methods=["POST"]),
    ]
