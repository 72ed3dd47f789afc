"""The OpenAI Responses API: `POST /v1/responses` (through the exchange, translated to chat
completions or native, gateway/apis/responses.py), and the stored responses: `GET` and
`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

A response made with `store: true` (the default) is written to the store before its last bytes
leave, so the client can retrieve it, or continue from it with `previous_response_id`, the
moment it has the answer. It belongs to the API key that made it: another key gets 404.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.apis.responses import ResponsesTranslation
from gateway.apis.responses_input import ResponsesRequest, parse_responses
from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.request import RESPONSES, json_object, read_body
from gateway.front.params import path_id
from gateway.front.routes.files import int_param, store_of
from gateway.front.routes.openai import check_model
from gateway.front.routes.translated import chat_request, serve_translated
from gateway.proxy.context import Gateway
from gateway.store import Owner, Store

log = logging.getLogger(__name__)


def response_not_found(response_id: str, param: str | None = None) -> GatewayError:
    return GatewayError(
        404, f"Response with id '{response_id[:100]}' not found.", param=param, code=Code.RESPONSE_NOT_FOUND
    )


class StoredTranslation(ResponsesTranslation):
    """Writes the finished response to the store (when the request asked to store it)."""

    def __init__(
        self, request: ResponsesRequest, history: list[dict[str, Any]], store: Store | None, owner: Owner
    ) -> None:
        super().__init__(request, history, int(time.time()))
        self._store = store
        self._owner = owner

    async def finished(self) -> None:
        final = self.final
        if self._store is None or final is None or not isinstance(final.get("id"), str):
            return
        try:
            await self._store.save_response(final["id"], self._owner, final, self.input_items)
        except Exception as exc:  # the answer stands; only its retrieval later fails
            log.warning("response %s not stored: %s", final["id"], exc)


class ResponsesEndpoint:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        principal = await gw.access.authenticate(scope)
        raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
        parsed = parse_responses(json_object(raw))
        history: list[dict[str, Any]] = []
        if parsed.previous_response_id is not None:
            earlier = await store_of(gw).get_response(parsed.previous_response_id, principal.key_id)
            if earlier is None:
                raise response_not_found(parsed.previous_response_id, "previous_response_id")
            output = earlier.response.get("output")
            history = [*earlier.input_items, *(output if isinstance(output, list) else [])]
        store = gw.store.current if parsed.store else None  # a store down costs the retrieval later, not this answer
        t = StoredTranslation(parsed, history, store, principal.key_id)
        request = chat_request(RESPONSES, t, parsed.model, parsed.max_output_tokens, parsed.user, len(raw))
        check_model(gw, principal, request)
        await serve_translated(gw, principal, request, t, scope, receive, send)


class StoredResponseRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[Route]:
        return [
            Route("/v1/responses", ResponsesEndpoint(self.gw), methods=["POST"]),
            Route("/v1/responses/{response_id}", self.get, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.input_items, methods=["GET"]),
        ]

    async def _owner(self, request: Request) -> Owner:
        return (await self.gw.access.authenticate(request.scope)).key_id

    async def get(self, request: Request) -> Response:
        owner = await self._owner(request)
        response_id = path_id(request, "response_id")
        stored = await store_of(self.gw).get_response(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        return JSONResponse(stored.response)

    async def delete(self, request: Request) -> Response:
        owner = await self._owner(request)
        response_id = path_id(request, "response_id")
        if not await store_of(self.gw).delete_response(response_id, owner):
            raise response_not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        owner = await self._owner(request)
        response_id = path_id(request, "response_id")
        limit = int_param(request, "limit", 20, 1, 100)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("'order' must be asc or desc.", param="order")
        after = request.query_params.get("after")
        stored = await store_of(self.gw).get_response(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        items = list(stored.input_items) if order == "asc" else stored.input_items[::-1]
        if after is not None:
            ids = [item.get("id") for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0].get("id") if page else None,
                "last_id": page[-1].get("id") if page else None,
                "has_more": len(items) > limit,
            }
        )
