"""Settling in batches: the releases (reconciliations) of many requests in one script call.

Every request ends with a release (gateway/access/quota.py): its reservation replaced by what it
used, its lease freed. Run one by one, that is one EVALSHA per request; here the releases issued
in one loop iteration leave together as one `_SETTLE` call (per Redis Cluster slot: a script may
only touch keys of one slot), which does, release by release, exactly what `_RELEASE` does. Redis
runs the call atomically, so the totals (tokens, spend, day and month) are the same sums.

Ordering: `add` returns a future done once the call is handed to the Redis connection (the same
point a single release reached before: sent, not waited for). The request path awaits it before
the client's last byte, and commands of one connection run in order, so a client's next request
on this replica is admitted after its previous lease was freed.

A batch that fails (Redis down, NOSCRIPT after a Redis restart) goes to the retries release by
release (`_SETTLE` with one release, idempotent by lease id). A replica killed before a batch left loses at most
the releases of that loop iteration, and those requests' clients never got their last byte; their
reservations stay charged (the safe side: never less than used) and their leases count toward
max_concurrent until they expire (lease_ttl).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis.crc import key_slot

from gateway.access.quota_scripts import _SETTLE
from gateway.resp.client import Keys, LeanClient, ScriptKeys
from gateway.resp.cluster import ClusterClient

# (lease id, keys, the `_RELEASE` arguments): one request's release; a batch line's keys end with
# its charge record (gateway/access/quota.py)
Release = tuple[str, ScriptKeys, list[str | int]]
# called with a release the batch could not run, and the error (None: the script refused it)
Failed = Callable[[Release, BaseException | None], None]


class SettleBatch:
    def __init__(self, redis: LeanClient, failed: Failed) -> None:
        self._redis = redis
        self._failed = failed
        self._cluster = isinstance(redis, ClusterClient)
        self._queue: list[Release] = []
        self._sent: asyncio.Future[None] | None = None  # done when the queued releases have left
        self.calls = 0  # script calls made, for the bench and the tests
        self.releases = 0

    def add(self, release: Release) -> asyncio.Future[None]:
        """Queues a release; the future is done once it has been handed to Redis."""
        if self._sent is None:
            loop = asyncio.get_running_loop()
            self._sent = loop.create_future()
            loop.call_soon(self.flush)
        self._queue.append(release)
        return self._sent

    def flush(self) -> None:
        queue, self._queue = self._queue, []
        sent, self._sent = self._sent, None
        if queue:
            self.releases += len(queue)
            if self._cluster:
                groups: dict[int, list[Release]] = {}
                for release in queue:
                    groups.setdefault(key_slot(next(iter(release[1])).encode()), []).append(release)
                for group in groups.values():
                    self._send(group)
            else:
                self._send(queue)
        if sent is not None and not sent.done():
            sent.set_result(None)

    def _send(self, group: list[Release]) -> None:
        call_args: list[str | int] = []
        for _, keys, args in group:
            call_args += settle_args(keys, args)
        call_keys = group[0][1] if len(group) == 1 else Keys.join(keys for _, keys, _ in group)
        self.calls += 1
        self._redis.send_script(_SETTLE, call_keys, call_args).add_done_callback(lambda done: self._done(done, group))

    def _done(self, done: asyncio.Future[Any], group: list[Release]) -> None:
        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled() and not isinstance(done.result(), hiredis.ReplyError):
            return
        reason = error if error is not None else (TimeoutError("cancelled") if done.cancelled() else None)
        for release in group:
            self._failed(release, reason)


def settle_args(keys: ScriptKeys, args: list[str | int]) -> list[str | int]:
    """One release's `_SETTLE` arguments: its number of levels (negative when its keys end with a
    batch line's charge record), then `_RELEASE`'s."""
    levels = len(keys) // 4
    return [-levels if len(keys) % 4 else levels, *args]
