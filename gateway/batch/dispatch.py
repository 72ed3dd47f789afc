"""One batch line through the interactive request path: parse -> exchange -> relay into memory.

A line is an `ApiRequest` with `batch_id` set, run through the same `Exchange` as a client's
request (admission, engine pick and retry, accounting, metrics), with no client to watch and a
`send` that collects the answer. With `batch_id` set, admission charges the owner's key without
rpm or max_concurrent, and the scheduler (where there is one) puts the line below every
interactive band.

What is retried, and how:
- a tpm refusal waits for the next window (retry-after) and tries again;
- no healthy engine, every engine busy, Redis unreachable: wait and try again, for as long as
  the batch has time (its expiry or a cancel stops the line);
- an engine that failed (502, 504): up to MAX_ATTEMPTS tries, then the line fails;
- anything else (a daily or monthly budget spent, a revoked key, the engine's 4xx): the line
  fails with that error's code.

Charging: every run is admitted as its line (`batch_line`: the batch, the line, the claim's
number), and replaces the charge of the line's earlier runs (gateway/access/quota.py), so a line
that runs again (its replica died before recording it, or another took it over) is charged once.
What the last attempt was charged goes with the outcome as its spend row, written to the store
with the result (gateway/store/lines.py): the store counts it once too.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import orjson
from starlette.types import Message

from gateway.access.base import Principal
from gateway.core.errors import Code, GatewayError
from gateway.core.request import BatchLine, Endpoint, parse_request
from gateway.monitor.spend import line_spend
from gateway.proxy.context import Current, Gateway
from gateway.proxy.exchange import Exchange
from gateway.store import ClaimedLine, LineOutcome, Owner, SpendRow

MAX_ATTEMPTS = 3
# A line's charge record outlives its run by the time a takeover takes (its claim expires, its
# batch's lease too) and this: a rerun later than that is charged again.
RERUN_MARGIN = 600
WAIT_MIN = 0.5
WAIT_MAX = 10.0
TPM_WAIT_MAX = 61.0
OWNER_TTL = 30.0  # the owner's key record is read again this often (limits may change)
_WAIT = frozenset({Code.NO_HEALTHY_ENGINE, Code.ENGINES_OVERLOADED, Code.QUOTA_UNAVAILABLE})
# Limits that do not apply to batch lines: met only if a key's record changes under us; wait.
_NOT_FOR_BATCH = frozenset({Code.RPM_EXCEEDED, Code.CONCURRENCY_EXCEEDED})
_RETRY = frozenset({Code.UPSTREAM_ERROR, Code.UPSTREAM_TIMEOUT, Code.INTERNAL_ERROR})


@dataclass(slots=True)
class Collected:
    """An ASGI `send` that keeps the response: a batch line has no client to write to."""

    status: int = 0
    chunks: list[bytes] = field(default_factory=list)

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.chunks.append(message["body"])

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(slots=True)
class Charge:
    """What a line's last attempt here was charged, as its spend row (None: nothing). Kept apart
    from the outcome, so a job that aborts the line still knows it."""

    spend: SpendRow | None = None


class LineDispatcher:
    """Runs the lines of one batch as its owner."""

    def __init__(self, current: Current, endpoint: Endpoint, batch_id: str, owner: Owner, keep: int) -> None:
        self.current = current
        self.endpoint = endpoint
        self.batch_id = batch_id
        self.owner = owner
        self.keep = keep  # seconds a line's charge record outlives its run (gateway/access/quota.py)
        self._principal: Principal | None = None
        self._principal_at = 0.0

    @property
    def gw(self) -> Gateway:
        """The newest configuration: a line runs on the one it starts with (its exchange keeps it)."""
        return self.current.gw

    async def run(self, line: ClaimedLine, charge: Charge) -> LineOutcome:
        """The line's outcome, carrying what it was charged (`charge` holds it meanwhile)."""
        outcome = await self._attempts(line, charge)
        return replace(outcome, spend=charge.spend)

    async def _attempts(self, line: ClaimedLine, charge: Charge) -> LineOutcome:
        failures = 0
        wait = WAIT_MIN
        while True:
            try:
                return await self._once(line, charge)
            except GatewayError as exc:
                if exc.code == Code.TPM_EXCEEDED:
                    await asyncio.sleep(min(TPM_WAIT_MAX, _retry_after(exc)))
                    continue
                if exc.code in _WAIT or exc.code in _NOT_FOR_BATCH:
                    await asyncio.sleep(wait)
                    wait = min(WAIT_MAX, wait * 2)
                    continue
                failures += 1
                if exc.code in _RETRY and failures < MAX_ATTEMPTS:
                    await asyncio.sleep(wait)
                    wait = min(WAIT_MAX, wait * 2)
                    continue
                return LineOutcome.failure(str(exc.code or "request_failed"), exc.message)

    async def _owner(self) -> Principal:
        """The batch's owner as a principal; a key that no longer exists raises 401 (the line
        fails), Redis out of reach raises 503 (the line waits)."""
        if self._principal is None or time.monotonic() - self._principal_at > OWNER_TTL:
            self._principal = await self.gw.access.principal_of(self.owner)
            self._principal_at = time.monotonic()
        return self._principal

    async def _once(self, line: ClaimedLine, charge: Charge) -> LineOutcome:
        principal = await self._owner()
        request = parse_request(line.body.encode(), self.endpoint)  # fresh: the exchange writes to it
        request.batch_id = self.batch_id
        request.batch_line = BatchLine(self.batch_id, line.line, line.attempts, self.keep)
        request_id = os.urandom(16).hex()
        collected = Collected()
        observe = self.gw.observe  # the line's access log line and span (gateway/observe/)
        with nullcontext() if observe is None else observe.batch_line(self.batch_id, request_id, self.endpoint.kind):
            exchange = Exchange(self.gw, principal, request, request_id.encode(), None)
            try:
                async with exchange:
                    await exchange.admit()
                    response = await exchange.call_engine()
                    await exchange.relay(response, collected)
            finally:  # this attempt's charge replaced the earlier ones' (none if it was refused)
                charge.spend = line_spend(exchange.grant, time.time())
            if exchange.obs is not None:
                exchange.obs.bytes_out = sum(map(len, collected.chunks))
        return outcome_of(collected.status, collected.body, request_id)


def outcome_of(status: int, body: bytes, request_id: str) -> LineOutcome:
    """The engine's answer as the line's outcome: 200 goes to the output file, anything else to
    the error file with the answer attached and its error code."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = f"The engine answered {status} with a body that is not JSON."
        return LineOutcome.failure("invalid_response", message, status_code=status, request_id=request_id)
    text = body.decode()
    if status == 200:
        return LineOutcome.success(status, request_id, text)
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or error.get("type") or f"http_{status}"
    message = error.get("message") or f"The engine answered {status}."
    return LineOutcome.failure(str(code), str(message), status_code=status, request_id=request_id, body=text)


def _retry_after(exc: GatewayError) -> float:
    try:
        return max(1.0, float(exc.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0
