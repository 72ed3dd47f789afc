"""API keys and quotas on the request path: authenticate -> admit (reserve) -> finish (reconcile)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from starlette.requests import Request

from gateway.access import Principal, Ticket
from gateway.errors import GatewayError
from gateway.keys import KeyStore
from gateway.metrics import GatewayMetrics
from gateway.quota import Admission, Quota
from gateway.settings import AuthSettings
from gateway.tokens import PromptCounter

log = logging.getLogger(__name__)

ADMIN = Principal(key_id="admin")


def bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise GatewayError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise GatewayError(401, "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key")
    return secret


def is_admin_key(secret: str, admin_key: str | None) -> bool:
    # Constant-time, so response timing says nothing about how much of a guess was right.
    return admin_key is not None and hmac.compare_digest(secret.encode(), admin_key.encode())


def _invalid_key() -> GatewayError:
    # Never echo the secret, not even in part.
    return GatewayError(401, "Incorrect, revoked or expired API key.", code="invalid_api_key")


def _token_limited(key: Any) -> bool:
    return key.tpm is not None or key.daily_tokens is not None or key.monthly_tokens is not None


class KeyedAccess:
    def __init__(
        self, keys: KeyStore, quota: Quota, counter: PromptCounter, settings: AuthSettings, metrics: GatewayMetrics
    ) -> None:
        self.keys = keys
        self.quota = quota
        self._counter = counter
        self._settings = settings
        self._metrics = metrics
        self._in_flight: dict[str, Admission] = {}  # lease id -> admission
        self._refresher: asyncio.Task[None] | None = None
        self._errors_seen = 0
        self._opened_seen = 0

    async def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_leases(), name="lease-refresh")

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)

    async def authenticate(self, request: Request) -> Principal:
        secret = bearer(request)
        if self._settings.admin_is_client and is_admin_key(secret, self._settings.admin_key):
            return ADMIN
        key = await self.keys.resolve(secret)
        self._sync_metrics()
        if key is None or not key.usable(time.time()):
            raise _invalid_key()
        return Principal(key.id, key.models, key)

    async def admit(self, principal: Principal, model: str, body: dict[str, Any]) -> Ticket:
        key = principal.key
        if key is None:
            return Ticket(principal)
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        prompt = 0
        if _token_limited(key):
            if max_tokens is None and "input" not in body:
                # Without a cap the engine may write up to the context length: set one, so the
                # reservation bounds what the request can spend and a budget is never overspent.
                max_tokens = body["max_tokens"] = self._settings.default_max_tokens
            prompt = self._counter.count(model, body)
        prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) and _is_batch(body["prompt"]) else 1
        reserve = prompt + int(max_tokens or 0) * int(n or 1) * prompts
        try:
            admission = await self.quota.admit(key, model, reserve)
        except GatewayError as exc:
            if exc.status == 429:
                self._metrics.quota_rejections.labels(exc.code or "unknown").inc()
            self._metrics.key_requests.labels(key.id, str(exc.status)).inc()
            raise
        finally:
            self._sync_metrics()
        self._in_flight[admission.lease_id] = admission
        ticket = Ticket(principal, admission, dict(admission.headers))
        ticket.prompt_estimate = prompt
        return ticket

    async def finish(self, ticket: Ticket, status: int, exact: bool, prompt: int, completion: int) -> None:
        admission = ticket.admission
        key_id = ticket.principal.key_id
        if key_id is not None:
            self._metrics.key_requests.labels(key_id, str(status)).inc()
        if admission is None:
            return
        self._in_flight.pop(admission.lease_id, None)
        if not exact:
            # The engine never reported usage (aborted, failed): charge what we know was spent.
            prompt = ticket.prompt_estimate if completion else 0
        await self.quota.release(admission, prompt, completion)
        self._sync_metrics()
        if prompt:
            self._metrics.key_tokens.labels(admission.key_id, "prompt").inc(prompt)
        if completion:
            self._metrics.key_tokens.labels(admission.key_id, "completion").inc(completion)

    def _sync_metrics(self) -> None:
        """Mirror the quota's error counters into Prometheus (they count in the quota module)."""
        errors = self.quota.redis_errors
        if errors > self._errors_seen:
            self._metrics.redis_errors.inc(errors - self._errors_seen)
            self._errors_seen = errors
        opened = self.quota.fail_open_admissions
        if opened > self._opened_seen:
            self._metrics.fail_open.inc(opened - self._opened_seen)
            self._opened_seen = opened

    async def _refresh_leases(self) -> None:
        # Long streams outlive a lease; extend every in-flight one in one pipeline.
        interval = max(0.1, self.quota.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            if self._in_flight:
                await self.quota.refresh_leases(list(self._in_flight.values()))


def _is_batch(prompt: list[Any]) -> bool:
    return bool(prompt) and not all(isinstance(t, int) for t in prompt)
