"""The `pricing.alerts` part of the pricing section: a webhook told once per period when a budget
passes its soft threshold.

    pricing:
      alerts:
        url: https://hooks.example.com/llm-gateway     # POSTed JSON, signed (GATEWAY_ALERT_SECRET)
        threshold: 0.8                                 # of each daily and monthly budget
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader


@dataclass(frozen=True)
class AlertSettings:
    url: str  # where the webhook goes
    secret: str | None = None  # HMAC-SHA256 key of the signature header (GATEWAY_ALERT_SECRET)
    threshold: float = 0.8  # the share of a budget that sends the alert
    interval: float = 5.0  # seconds between checks of the budgets that saw spend
    attempts: int = 6  # deliveries tried, with backoff doubling from 1 s


def parse_alerts(r: Reader, pricing: Mapping[str, Any], env: Mapping[str, str]) -> AlertSettings | None:
    raw = pricing.get("alerts")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise r.fail("pricing.alerts", "must be a mapping {url, threshold}")
    p = "pricing.alerts."
    r.known(raw, p, ("url", "threshold", "interval", "attempts"))
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise r.fail(p + "url", "must be the webhook's http(s) URL")
    return AlertSettings(
        url=url,
        secret=env.get("GATEWAY_ALERT_SECRET") or None,
        threshold=r.get(raw, "threshold", p, float, 0.8, 0.01, 1.0),
        interval=r.get(raw, "interval", p, float, 5.0, 0.1, 3600),
        attempts=r.get(raw, "attempts", p, int, 6, 1, 20),
    )
