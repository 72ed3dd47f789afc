"""The `pricing` section: what a model costs per million tokens, in one currency.

    pricing:
      currency: USD
      models:
        tiny: {input: 0.5, output: 1.5, cached_input: 0.25}

Spend is counted in nano-units of the currency (1e-9) as integers, so Redis adds it exactly
(HINCRBY) and a Lua script compares it with a budget without rounding drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.settings.alerts import AlertSettings, parse_alerts
from gateway.settings.reader import Reader

NANOS = 1_000_000_000  # nano-units per currency unit
MAX_PRICE = 1_000_000.0  # per million tokens: beyond this a price is a typo, not a price
_PRICE_KEYS = ("input", "output", "cached_input")


@dataclass(frozen=True)
class Price:
    input: float  # per million prompt tokens
    output: float  # per million completion tokens
    cached_input: float  # per million prompt tokens served from the engine's prefix cache

    def cost(self, prompt: int, completion: int, cached: int = 0) -> int:
        """Nano-units for this usage (rounded to the nearest: at most half a nano off per request)."""
        cached = min(max(cached, 0), prompt)
        # price per million tokens * tokens * 1e9 / 1e6 nanos = price * tokens * 1000
        exact = ((prompt - cached) * self.input + cached * self.cached_input + completion * self.output) * 1000
        return round(exact)

    def ceiling(self, prompt: int, completion: int) -> int:
        """The most this usage may cost (no cached discount), rounded up: what admission reserves."""
        return math.ceil((prompt * self.input + completion * self.output) * 1000)


@dataclass(frozen=True)
class PricingSettings:
    currency: str = "USD"  # the currency of prices, spend and budgets
    # model -> {input, output, cached_input} per million tokens
    models: Mapping[str, Price] = field(default_factory=dict)
    alerts: AlertSettings | None = None  # budget alerts by webhook (gateway/settings/alerts.py)

    def price(self, model: str) -> Price | None:
        return self.models.get(model)


def parse_pricing(
    r: Reader, data: Mapping[str, Any], model_names: set[str], env: Mapping[str, str] | None = None
) -> PricingSettings:
    section = r.section(data, "pricing", "")
    r.known(section, "pricing.", ("currency", "models", "alerts"))
    currency = section.get("currency", "USD")
    if not isinstance(currency, str) or not 1 <= len(currency) <= 10 or not currency.isalnum():
        raise r.fail("pricing.currency", f"must be a currency code such as USD, got {currency!r}")
    raw = r.section(section, "models", "pricing.")
    models: dict[str, Price] = {}
    for name, entry in raw.items():
        path = f"pricing.models.{name}."
        if name not in model_names:
            raise r.fail(
                f"pricing.models.{name}", f"names no model of `models` (known: {', '.join(sorted(model_names))})"
            )
        if not isinstance(entry, Mapping):
            raise r.fail(f"pricing.models.{name}", "must be a mapping {input, output, cached_input}")
        r.known(entry, path, _PRICE_KEYS)
        values = [r.get(entry, k, path, float, None, 0, MAX_PRICE) for k in _PRICE_KEYS]
        if values[0] is None or values[1] is None:
            raise r.fail(f"pricing.models.{name}", "needs both `input` and `output`")
        cached = values[2] if values[2] is not None else values[0]  # no cache discount unless priced
        models[str(name)] = Price(values[0], values[1], cached)
    return PricingSettings(currency.upper(), models, parse_alerts(r, section, env or {}))
