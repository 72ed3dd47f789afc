"""The per-process stand-in for Redis while it is unreachable (`redis.failure_mode: open`).

rpm and tpm per fixed minute and concurrency, from the limits on the caller's ApiKey snapshot.
Daily and monthly quotas cannot be held per process and are not enforced here (documented).
"""

from __future__ import annotations

from gateway.access.keys import ApiKey
from gateway.access.quota_windows import Window, rate_headers, refusal, refused_key


class LocalLimiter:
    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._windows: dict[str, list[int]] = {}  # key id -> [minute, requests, tokens]
        self._inflight: dict[str, int] = {}
        self._leases: dict[str, tuple[str, int, int]] = {}  # lease id -> (key id, minute, reserved)

    def admit(self, key: ApiKey, model: str, reserve: int, now: float, win: Window, lease_id: str) -> dict[str, str]:
        if not key.usable(now):
            raise refused_key("revoked" if key.revoked_at is not None else "expired", model, key.expires_at)
        if not key.may_use(model):
            raise refused_key("model", model)
        counts = self._window(key.id, win.minute)
        requests, tokens = counts[1], counts[2]
        headers = rate_headers(key.rpm, requests, key.tpm, tokens, win.minute_left)
        if key.rpm is not None and requests + 1 > key.rpm:
            raise refusal("rpm", "key", requests, key.rpm, reserve, win, headers)
        if key.tpm is not None and tokens + reserve > key.tpm:
            raise refusal("tpm", "key", tokens, key.tpm, reserve, win, headers)
        inflight = self._inflight.get(key.id, 0)
        if key.max_concurrent is not None and inflight >= key.max_concurrent:
            raise refusal("concurrency", "key", inflight, key.max_concurrent, reserve, win, headers)
        counts[1] += 1
        counts[2] += reserve
        self._inflight[key.id] = inflight + 1
        self._leases[lease_id] = (key.id, win.minute, reserve)
        return rate_headers(key.rpm, counts[1], key.tpm, counts[2], win.minute_left)

    def release(self, lease_id: str, used: int) -> None:
        """Replace the reservation by what was used. A repeated release is a no-op."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        key_id, minute, reserved = lease
        left = self._inflight.get(key_id, 0) - 1
        if left > 0:
            self._inflight[key_id] = left
        else:
            self._inflight.pop(key_id, None)
        counts = self._windows.get(key_id)
        if counts is not None and counts[0] == minute:
            counts[2] += used - reserved

    def _window(self, key_id: str, minute: int) -> list[int]:
        counts = self._windows.get(key_id)
        if counts is None or counts[0] != minute:
            if len(self._windows) >= self.max_keys:
                self._windows = {k: c for k, c in self._windows.items() if c[0] == minute}
            counts = self._windows[key_id] = [minute, 0, 0]
        return counts
