"""Budget alerts: when the spend of a key, team or organization passes the soft threshold of its
daily or monthly budget (`pricing.alerts.threshold`, e.g. 80%), one webhook per budget and period.

Never on the request path: settle only notes which levels spent (`note`, O(1)); every `interval`
seconds a background task reads those levels' budgets and spend from Redis, and claims each alert
with SET NX on a key in the level's own slot, so exactly one replica sends it, once per period.
Delivery is retried with backoff (1 s, 2 s, 4 s, ...) for `attempts` tries.

The body is JSON; `x-gateway-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` with
GATEWAY_ALERT_SECRET as the key lets the receiver check it came from the gateway, and is fresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.access.keys import REDIS_DOWN
from gateway.access.levels import Level
from gateway.access.quota_windows import window
from gateway.core.times import iso
from gateway.settings import NANOS
from gateway.settings.alerts import AlertSettings

log = logging.getLogger(__name__)

MAX_PENDING = 100_000


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class BudgetAlerts:
    def __init__(
        self,
        settings: AlertSettings,
        redis: aioredis.Redis | RedisCluster,
        currency: str,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.currency = currency
        self._http = http or httpx.AsyncClient(timeout=10)
        self._pending: dict[str, Level] = {}
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0

    def note(self, levels: tuple[Level, ...]) -> None:
        """Settle: these levels spent money. No I/O."""
        if len(self._pending) < MAX_PENDING:
            for level in levels:
                self._pending[level.base] = level

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="budget-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self._http.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.check()
            except REDIS_DOWN as exc:
                log.warning("budget alerts: Redis unreachable, checking again later: %r", exc)
            except Exception:
                log.exception("budget alerts: the check failed")

    async def check(self, now: float | None = None) -> int:
        """Reads the noted levels' budgets and spend; claims and sends the alerts due. Returns how
        many this replica claimed."""
        levels, self._pending = list(self._pending.values()), {}
        if not levels:
            return 0
        now = time.time() if now is None else now
        win = window(now)
        async with self.redis.pipeline(transaction=False) as pipe:
            for lv in levels:
                pipe.hmget(lv.limits, "daily_budget", "monthly_budget", "name")
                pipe.hget(lv.base + "day:" + win.day, "spend")
                pipe.hget(lv.base + "month:" + win.month, "spend")
            replies = await pipe.execute()
        claimed = 0
        for i, lv in enumerate(levels):
            (daily, monthly, name), day_spend, month_spend = replies[3 * i], replies[3 * i + 1], replies[3 * i + 2]
            for period, budget, spent, start, left in (
                ("day", daily, day_spend, win.day, win.day_left),
                ("month", monthly, month_spend, win.month, win.month_left),
            ):
                cap, used = _int(budget), _int(spent)
                if not cap or used < self.settings.threshold * cap:
                    continue
                mark = f"{lv.base}alerted:{period}:{start}"
                if not await self.redis.set(mark, "1", nx=True, ex=int(left) + 3600):
                    continue  # another replica (or an earlier check) has sent it
                claimed += 1
                event = {
                    "id": "evt_" + secrets.token_hex(12),
                    "type": "budget.threshold_reached",
                    "level": lv.kind,
                    "level_id": lv.id,
                    "name": _text(name),
                    "period": period,
                    "period_start": start,
                    "resets_at": iso(round(now + left)),
                    "threshold": self.settings.threshold,
                    "budget": cap / NANOS,
                    "spend": used / NANOS,
                    "currency": self.currency,
                    "created_at": iso(round(now)),
                }
                task = asyncio.create_task(self._deliver(event), name="budget-alert-delivery")
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
        return claimed

    async def _deliver(self, event: dict[str, Any]) -> None:
        body = orjson.dumps(event)
        delay = 1.0
        for attempt in range(1, self.settings.attempts + 1):
            stamp = int(time.time())
            headers = {"content-type": "application/json", "x-gateway-event-id": event["id"]}
            if self.settings.secret:
                headers["x-gateway-signature"] = signature(self.settings.secret, stamp, body)
            try:
                r = await self._http.post(self.settings.url, content=body, headers=headers)
                if r.status_code < 300:
                    self.sent += 1
                    log.info("budget alert sent: %s %s %s", event["level"], event["level_id"], event["period"])
                    return
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            if attempt < self.settings.attempts:
                log.warning(
                    "budget alert %s: delivery %d failed (%s), retrying in %.0f s", event["id"], attempt, why, delay
                )
                await asyncio.sleep(delay)
                delay *= 2
        self.failed += 1
        log.error(
            "budget alert %s for %s %s: not delivered after %d tries",
            event["id"],
            event["level"],
            event["level_id"],
            attempt,
        )


def _int(value: Any) -> int:
    try:
        return int(value) if value not in (None, b"", "") else 0
    except (TypeError, ValueError):
        return 0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
