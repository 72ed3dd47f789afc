"""Budget alerts against a real Redis and a real HTTP receiver: one signed webhook per budget and
period even with two replicas checking, retried with backoff while the receiver fails, none below
the threshold."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.access.keys import KeyStore
from gateway.access.quota import Quota
from gateway.access.teams import TeamStore
from gateway.monitor.alerts import BudgetAlerts, signature
from gateway.resp.client import RespClient
from gateway.settings.alerts import AlertSettings
from testkit.redis_server import RedisServer
from tests.test_quota import MODEL, TIMEOUT, T
from tests.test_teams_quota import key_of, team

SECRET = "alert-secret-for-tests"


class Receiver:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.seen.append((dict(self.headers), body))
                ok = len(receiver.seen) > receiver.failures
                self.send_response(204 if ok else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    try:
        yield r
    finally:
        r.server.shutdown()


def test_one_signed_alert_per_budget_and_period(redis_server: RedisServer, receiver: Receiver) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        resp = RespClient(redis_server.url, TIMEOUT)
        settings = AlertSettings(url=receiver.url, secret=SECRET, threshold=0.8, attempts=4)
        replicas = [BudgetAlerts(settings, client, "EUR"), BudgetAlerts(settings, client, "EUR")]
        try:
            quota = Quota(resp, redis_timeout=TIMEOUT)
            t = await team(TeamStore(client), name="payments", daily_budget=1.0, monthly_budget=100.0)
            k = await key_of(KeyStore(client), t)
            levels = quota.levels(k)
            adm = await quota.admit(k, MODEL, 10, now=T, money=700_000_000)
            await quota.release(adm, 5, 5, 700_000_000)  # 0.7 of 1.0: below the threshold
            for r in replicas:
                r.note(levels)
            assert [await r.check(now=T) for r in replicas] == [0, 0]
            for _ in range(3):  # 0.8 (the threshold), 0.9, 1.0: still one alert
                adm = await quota.admit(k, MODEL, 10, now=T, money=100_000_000)
                await quota.release(adm, 5, 5, 100_000_000)
                for r in replicas:
                    r.note(levels)
                await asyncio.gather(*(r.check(now=T) for r in replicas))
            for _ in range(100):  # the deliveries: two refused, the third taken (1 s + 2 s of backoff)
                if any(r.sent for r in replicas):
                    break
                await asyncio.sleep(0.1)
            assert sum(r.sent for r in replicas) == 1 and not any(r.failed for r in replicas)
        finally:
            for r in replicas:
                await r.stop()
            await client.aclose()
            await resp.close()

    asyncio.run(main())
    assert len(receiver.seen) == 3  # two failed tries and the delivery, all of one event
    ids = {headers["x-gateway-event-id"] for headers, _ in receiver.seen}
    assert len(ids) == 1
    headers, body = receiver.seen[-1]
    event = json.loads(body)
    assert event["type"] == "budget.threshold_reached" and event["level"] == "team" and event["period"] == "day"
    assert event["budget"] == 1.0 and event["spend"] == pytest.approx(0.8) and event["currency"] == "EUR"
    assert event["name"] == "payments" and event["resets_at"] == "2030-01-16T00:00:00Z"
    stamp = int(headers["x-gateway-signature"].split(",")[0][2:])
    assert headers["x-gateway-signature"] == signature(SECRET, stamp, body)
    forged = hmac.new(b"wrong", f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert forged not in headers["x-gateway-signature"]
