"""vLLM's other endpoints, passed through with keys and quotas: `/tokenize`, `/detokenize`,
`/v1/rerank` (and `/rerank`, `/v2/rerank`), `/v1/score` (the audio endpoints: audio.py).

Each is routed by its `model` like chat and goes through the same exchange (admission, engine
slot, relay, settle with the usage the answer reports), untouched but for the upstream model
name. Only engines that serve the endpoint (`apis:` in their config; all of them for vLLM) can
take it: a model none of whose engines does answers 404 saying so.
"""

from __future__ import annotations

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.apis.checks import model_of
from gateway.core.errors import Code, GatewayError
from gateway.core.request import ApiRequest, Endpoint, json_object, read_body
from gateway.front.routes.openai import check_model
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange

# (path, the `api` label, the engines' `apis:` name that serves it)
PASSED = (
    ("/tokenize", "tokenize", "tokenize"),
    ("/detokenize", "detokenize", "tokenize"),
    ("/v1/rerank", "rerank", "rerank"),
    ("/rerank", "rerank", "rerank"),
    ("/v2/rerank", "rerank", "rerank"),
    ("/v1/score", "score", "score"),
)


def not_served(model: str, path: str) -> GatewayError:
    return GatewayError(
        404,
        f"No engine of the model '{model}' serves {path} (engines list what they serve in `apis`).",
        param="model",
        code=Code.ENDPOINT_NOT_SERVED,
    )


def served_by(gw: Gateway, model: str, api: str) -> bool:
    """Whether an engine of the model's routes serves `api` itself (its `apis:`)."""
    router = gw.router
    return any(api in engine.settings.apis for route in router.routes[model] for engine in router.members(route))


class PassThrough:
    def __init__(self, gw: Gateway, path: str, api: str, served_as: str) -> None:
        self.gw = gw
        self.endpoint = Endpoint(path, api, "prompt", False)
        self.served_as = served_as

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        principal = await gw.access.authenticate(scope)
        raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
        body = json_object(raw)
        request = ApiRequest(self.endpoint, model_of(body), body, size=len(raw))
        check_model(gw, principal, request)
        if not served_by(gw, request.model, self.served_as):
            raise not_served(request.model, self.endpoint.path)
        async with Exchange(gw, principal, request, scope["request_id"], receive) as exchange:
            await exchange.admit()
            response = await exchange.call_engine()
            await exchange.relay(response, send)


def passthrough_routes(gw: Gateway) -> list[Route]:
    return [Route(path, PassThrough(gw, path, api, served), methods=["POST"]) for path, api, served in PASSED]
