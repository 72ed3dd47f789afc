"""Quota arithmetic that needs no Redis: time windows, OpenAI's rate-limit headers, and the 429s.

Shared by the Redis admission (gateway/access/quota.py) and the per-process fail-open limiter
(gateway/access/local_limiter.py), so both answer with the same headers and the same wording.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from gateway.core.errors import BUDGETS, Code, GatewayError, invalid_key, model_not_allowed
from gateway.core.times import iso


def reset_after(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: "12ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets `now` falls in, and the seconds until each resets."""

    minute: int
    day: str
    month: str
    minute_left: float
    day_left: float
    month_left: float


def window(now: float) -> Window:
    minute = int(now // 60)
    day, month, day_end, month_end = _calendar(int(now // 86400))
    return Window(minute, day, month, (minute + 1) * 60 - now, day_end - now, month_end - now)


@lru_cache(maxsize=8)
def _calendar(day_index: int) -> tuple[str, str, float, float]:
    d = date(1970, 1, 1) + timedelta(days=day_index)
    first_next = date(d.year + d.month // 12, d.month % 12 + 1, 1)
    month_end = datetime(first_next.year, first_next.month, 1, tzinfo=UTC).timestamp()
    return d.isoformat(), d.isoformat()[:7], (day_index + 1) * 86400.0, month_end


def rate_headers(rpm: int | None, requests: int, tpm: int | None, tokens: int, left: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    reset = reset_after(left)
    if rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - requests))
        headers["x-ratelimit-reset-requests"] = reset
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - tokens))
        headers["x-ratelimit-reset-tokens"] = reset
    return headers


# What the admission script names -> (the key's code, the noun for a level's message)
_LIMIT_CODES = {
    "monthly_budget": Code.BUDGET_EXCEEDED,
    "daily_budget": Code.BUDGET_EXCEEDED,
    "monthly_tokens": Code.MONTHLY_TOKENS_EXCEEDED,
    "daily_tokens": Code.DAILY_TOKENS_EXCEEDED,
    "rpm": Code.RPM_EXCEEDED,
    "tpm": Code.TPM_EXCEEDED,
    "concurrency": Code.CONCURRENCY_EXCEEDED,
}
_TOKEN_LIMITS = frozenset({"tpm", "daily_tokens", "monthly_tokens"})
_OWNER = {"team": "The key's team", "org": "The key's organization"}


def limit_code(limit: str, level: str) -> Code:
    """`rpm` at level `team` -> team_rpm_exceeded; at level `key` -> rpm_exceeded."""
    code = _LIMIT_CODES[limit]
    return code if level == "key" else Code(f"{level}_{code.value}")


def refusal(
    limit: str,
    level: str,
    used: int,
    cap: int,
    reserve: int,
    win: Window,
    headers: dict[str, str],
    currency: str = "USD",
) -> GatewayError:
    """One 429 per limit and level; retry-after is when that limit next has room (at least 1 s).
    Money figures (`used`, `cap`) are in nano-units of `currency`."""
    if limit == "monthly_budget":
        msg, wait = f"Monthly budget spent: {_cash(used, currency)} of {_cash(cap, currency)}", win.month_left
    elif limit == "daily_budget":
        msg, wait = f"Daily budget spent: {_cash(used, currency)} of {_cash(cap, currency)}", win.day_left
    elif limit == "monthly_tokens":
        msg, wait = f"Monthly token quota exhausted: {used} of {cap} used", win.month_left
    elif limit == "daily_tokens":
        msg, wait = f"Daily token quota exhausted: {used} of {cap} used", win.day_left
    elif limit == "rpm":
        msg, wait = f"Rate limit reached: {cap} requests per minute", win.minute_left
    elif limit == "tpm":
        msg, wait = f"Rate limit reached: {cap} tokens per minute, {used} used", win.minute_left
    else:
        msg, wait = f"Too many concurrent requests: the limit is {cap}", 1.0
    if level != "key":
        msg = f"{_OWNER.get(level, level)}: {msg[0].lower()}{msg[1:]}"
    if limit in _TOKEN_LIMITS:
        msg += f", this request reserves {reserve} (prompt + max_tokens)"
        if reserve > cap:
            msg += "; it can never fit, lower max_tokens"
    elif limit.endswith("_budget"):
        msg += f"; it resets at {iso(time.time() + wait)}"
    retry = max(1, math.ceil(wait))
    code = limit_code(limit, level)
    kind = "insufficient_quota" if code in BUDGETS else "rate_limit_exceeded"
    return GatewayError(
        429, f"{msg}. Retry after {retry}s.", code=code, type=kind, headers={"retry-after": str(retry), **headers}
    )


def _cash(nanos: int, currency: str) -> str:
    return f"{nanos / 1_000_000_000:.6f}".rstrip("0").rstrip(".") + f" {currency}"


def refused_key(reason: str, model: str, expires_at: float | None = None) -> GatewayError:
    if reason == "superseded":  # a batch line's run of an older claim: another runner has the line
        return GatewayError(409, "This batch line was taken over by another run.", code=Code.BATCH_LINE_SUPERSEDED)
    if reason == "model":
        return model_not_allowed(model)
    if reason == "revoked":
        return invalid_key("This API key has been revoked.")
    if reason == "expired":
        return invalid_key(f"This API key expired at {iso(expires_at)}.")
    return invalid_key("Incorrect API key provided.")
