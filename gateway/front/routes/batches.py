"""The OpenAI Batches API (create, list, retrieve, cancel) and the operators' view under /admin.

`POST /v1/batches` checks the request (4xx for a bad endpoint, window, metadata, an input file
that is not the caller's or not for `batch`), then every line of the input file (see
gateway/batch/validate.py). A file with bad lines gives a batch that is `failed` at once with
every bad line in `errors`, as OpenAI does; a good one gives a batch `in_progress` with all its
lines stored, which any replica's runner then takes up.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access.admin_auth import AdminAuth
from gateway.access.base import Principal
from gateway.batch.objects import batch_object, check_metadata, list_object, parse_window
from gateway.batch.runner import BatchRunner
from gateway.batch.validate import InvalidLine, LineRules, valid_lines, validate_file
from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.request import ENDPOINTS, json_object, read_body
from gateway.core.text import check_text
from gateway.front.params import path_id, query_id
from gateway.front.routes.files import file_content, file_not_found, int_param, store_of
from gateway.proxy.context import Gateway
from gateway.store import (
    ALL_OWNERS,
    Batch,
    BatchError,
    BatchSpec,
    DuplicateCustomIdError,
    OwnerScope,
    StoreError,
)

MAX_CREATE_BODY = 64 * 1024
FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")


def batch_not_found(batch_id: str) -> GatewayError:
    return GatewayError(404, f"No such Batch object: {batch_id}", param="batch_id", code=Code.BATCH_NOT_FOUND)


class BatchRoutes:
    def __init__(self, gw: Gateway, runner: BatchRunner, auth: AdminAuth | None = None) -> None:
        self.admin_auth = auth or AdminAuth(gw.settings.auth.admin_key)
        self.gw = gw
        self.runner = runner

    def routes(self) -> list[Route]:
        return [
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
            Route("/admin/batches", self.admin_list, methods=["GET"]),
            Route("/admin/batches/{batch_id}", self.admin_get, methods=["GET"]),
            Route("/admin/batches/{batch_id}/cancel", self.admin_cancel, methods=["POST"]),
            Route("/admin/files/{file_id}/content", self.admin_file_content, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        principal = await self.gw.access.authenticate(request.scope)
        raw = await read_body(request.scope, request.receive, MAX_CREATE_BODY)
        body = json_object(raw)
        for name in body:
            if name not in FIELDS:
                raise invalid(f"Unknown field '{name}'.", param=name)
        spec = self._spec(principal, body)
        return JSONResponse(batch_object(await self._create(principal, spec)))

    def _spec(self, principal: Principal, body: dict[str, Any]) -> BatchSpec:
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise invalid("'input_file_id' is required: the id of a file uploaded for 'batch'.", param="input_file_id")
        check_text(file_id, "input_file_id")
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise invalid(f"'endpoint' must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}.", param="endpoint")
        window = parse_window(body.get("completion_window"), self.gw.settings.batch.min_completion_window)
        return BatchSpec(principal.key_id, endpoint, file_id, window, check_metadata(body.get("metadata")))

    async def _create(self, principal: Principal, spec: BatchSpec) -> Batch:
        store = store_of(self.gw)
        record = await store.get_file(spec.input_file_id, principal.key_id)
        if record is None:
            raise file_not_found(spec.input_file_id, "input_file_id")
        if record.purpose != "batch":
            raise GatewayError(
                400,
                f"The file {record.id} was uploaded for '{record.purpose}'; a batch needs a file with purpose 'batch'.",
                param="input_file_id",
                code=Code.INVALID_FILE_PURPOSE,
            )

        endpoint = ENDPOINTS[spec.endpoint]
        served = {m.name: m for m in self.gw.settings.models}

        def check_model(model: str) -> BatchError | None:
            if not self.gw.router.knows(model):
                return BatchError("model_not_found", f"The model '{model}' does not exist.")
            settings = served.get(model)
            if settings is not None and not settings.serves(endpoint.kind):
                return BatchError(
                    "model_not_supported",
                    f"The model '{model}' does not serve {endpoint.path} (it serves "
                    f"{', '.join(settings.endpoints or ())}): send it in a batch for its own endpoint.",
                )
            if not principal.may_use(model):
                return BatchError("model_not_allowed", f"This API key may not use the model '{model}'.")
            return None

        s = self.gw.settings
        rules = LineRules(endpoint, s.batch.max_lines, s.server.max_body_bytes, check_model)
        metrics = self.gw.metrics
        try:
            content = await store.file_content(record.id, principal.key_id)
            errors = await validate_file(content, rules) if content is not None else []
            if errors:
                metrics.batches_by["failed"].inc()
                return await store.create_failed_batch(spec, errors)
            content = await store.file_content(record.id, principal.key_id)
            if content is None:
                raise file_not_found(spec.input_file_id, "input_file_id")
            batch = await store.create_batch(spec, valid_lines(content, rules))
        except (StoreError, InvalidLine, DuplicateCustomIdError) as exc:
            # Only a file deleted while it was read, or a key's models changed meanwhile.
            raise invalid(f"The input file changed while the batch was being created: {exc}") from None
        metrics.batches_by["in_progress"].inc()
        self.runner.wake()
        return batch

    async def list_batches(self, request: Request) -> Response:
        owner = (await self.gw.access.authenticate(request.scope)).key_id
        return await self._list(request, owner)

    async def _list(self, request: Request, owner: OwnerScope, with_owner: bool = False) -> Response:
        page = await store_of(self.gw).list_batches(
            owner, limit=int_param(request, "limit", 20, 1, 100), after=query_id(request, "after")
        )
        data = [_admin_view(b) if with_owner else batch_object(b) for b in page.items]
        return JSONResponse(list_object(data, page.has_more))

    async def get_batch(self, request: Request) -> Response:
        owner = (await self.gw.access.authenticate(request.scope)).key_id
        return JSONResponse(batch_object(await self._get(path_id(request, "batch_id"), owner)))

    async def _get(self, batch_id: str, owner: OwnerScope) -> Batch:
        batch = await store_of(self.gw).get_batch(batch_id, owner)
        if batch is None:
            raise batch_not_found(batch_id)
        return batch

    async def cancel(self, request: Request) -> Response:
        owner = (await self.gw.access.authenticate(request.scope)).key_id
        return JSONResponse(batch_object(await self._cancel(path_id(request, "batch_id"), owner)))

    async def _cancel(self, batch_id: str, owner: OwnerScope) -> Batch:
        before = await self._get(batch_id, owner)
        batch = await store_of(self.gw).cancel_batch(batch_id, owner)
        if batch is None:
            raise batch_not_found(batch_id)
        if batch.status == "cancelling" and before.status != "cancelling":
            self.gw.metrics.batches_by["cancelling"].inc()
            self.runner.cancelled(batch_id)
        elif batch.status not in ("cancelling", "cancelled"):
            raise GatewayError(
                400,
                f"The batch is {batch.status}: only a batch that is validating or in progress can be cancelled.",
                param="batch_id",
                code=Code.BATCH_NOT_CANCELLABLE,
            )
        return batch

    async def admin_list(self, request: Request) -> Response:
        (await self.admin_auth.actor(request.scope)).require_read_all()
        return await self._list(request, ALL_OWNERS, with_owner=True)

    async def admin_get(self, request: Request) -> Response:
        (await self.admin_auth.actor(request.scope)).require_read_all()
        return JSONResponse(_admin_view(await self._get(path_id(request, "batch_id"), ALL_OWNERS)))

    async def admin_cancel(self, request: Request) -> Response:
        (await self.admin_auth.actor(request.scope)).require_admin()
        return JSONResponse(_admin_view(await self._cancel(path_id(request, "batch_id"), ALL_OWNERS)))

    async def admin_file_content(self, request: Request) -> Response:
        (await self.admin_auth.actor(request.scope)).require_read_all()
        return await file_content(self.gw, path_id(request, "file_id"), ALL_OWNERS)


def _admin_view(batch: Batch) -> dict[str, Any]:
    """The batch object plus who owns it and which process runs it, for operators."""
    return {**batch_object(batch), "owner": batch.owner, "lease_holder": batch.lease_holder}
