"""Leased budgets: a busy key's requests admitted from a slice of its budget that this process took
from Redis in one atomic step, so most requests cost no Redis round trip at all.

A slice is a reservation (gateway/access/slices.py): the lease script (gateway/access/lease_scripts.py)
checks every limit of every level (key, team, organization) as admission does and charges the
slice's requests, tokens, money and concurrency leases in full, so what all processes admit from
their slices never exceeds a limit. A request's settle is local bookkeeping; what a slice did not
use goes back in one script call (batched per loop iteration, like settles) when it stops and its
requests are done. A slice stops admitting when:

- it is full (requests, tokens, money or leases), or its calendar minute ends (a slice taken in
  minute M only admits in minute M, and what it charged stays in M's windows), or the key expires,
  or it is `lease_ttl / 2` old (its concurrency leases are only that long-lived);
- no request used it for `leases.idle` seconds;
- its key, the key's team or organization changes (a revoke, a PATCH of limits), a usage read
  asks for it, or another process was refused at one of its levels: the channel `<prefix>:leases`
  says so to every process, which gives its slices back at once.

A stopped slice goes back once its requests in flight are done, or after min(idle, lease_ttl / 4);
requests still in flight then keep their concurrency lease and reservation in Redis and are
released one by one, as without leases.

Sizing: about `horizon` seconds of the key's recent rate on this process, at most 1/share of the
room any limit has left, so near a limit slices shrink to one request, admitted and settled by
Redis as without leases. A key with fewer requests than that (below 2 per horizon) is admitted
request by request (gateway/access/quota.py), as without leases.

Bounds: a refusal at a level where other slices are live first asks for them back and tries once
more, waiting at most `leases.wait`: a request is never refused while another process holds an
unused slice, unless that process does not answer within `wait` (stopped, cut off), and then its
slices end by themselves within their life (the minute's end) plus idle. An admin change, and a
usage read, likewise returns once every slice of that key (team, organization) live before it has
come back, or after `wait`: from then on every process admits from Redis, which reads the change.
A process killed with slices: their unused part stays charged (the safe side: its minute window
for requests, the day and month for tokens and money), the usage split of the requests it settled
locally since the slice was taken is lost, and its concurrency leases expire after `lease_ttl`.
Redis unreachable: slices held keep admitting (they are reservations) until they stop; then the
configured failure mode. Each worker process of a replica holds its own slices. Batch lines
never use slices (their admission is per line, as without leases).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Iterable
from typing import Any

from gateway.access.keys import REDIS_DOWN, ApiKey
from gateway.access.lease_scripts import _LEASE, _RETURN, _UNLEASE
from gateway.access.levels import Level
from gateway.access.quota import RECALLS, TOMBSTONE_TTL, Admission, Quota
from gateway.access.quota_scripts import DAY_TTL, LEASE_KEEP_MS, MINUTE_TTL, MONTH_TTL
from gateway.access.quota_windows import rate_headers, window
from gateway.access.settle_batch import Failed, Release, SettleBatch
from gateway.access.slices import Account, Slice
from gateway.core.errors import GatewayError, quota_unavailable
from gateway.resp.client import Keys, LeanClient
from gateway.resp.subscriber import Subscriber
from gateway.settings import LeaseSettings

log = logging.getLogger(__name__)

SLICE_KEEP = 3600  # seconds a slice's record lives in Redis: a return later than that changes nothing
FORGET = 60.0  # seconds after its last request an account with nothing held is dropped
POLL = 0.002  # seconds between two looks at whether recalled slices are back
_PREFIX = "s" + secrets.token_hex(5)  # slice ids: unique per process, then a counter
_numbers = itertools.count()

Seat = tuple[Slice, str, dict[str, str]]  # the slice, the request's lease id, its rate-limit headers


class Refused(Exception):
    """The lease script refused the request that asked, at `level` (0: the key), while the slices
    `live` held budget there."""

    def __init__(self, error: GatewayError, level: int, live: list[Any]) -> None:
        self.error, self.level, self.live = error, level, live


class ReturnBatch(SettleBatch):
    """The returns of one loop iteration in one `_RETURN` call (per Redis Cluster slot)."""

    def __init__(self, redis: LeanClient, failed: Failed) -> None:
        super().__init__(redis, failed)
        self.unanswered: set[asyncio.Future[Any]] = set()  # sent, no reply yet (a shutdown waits for them)

    def _send(self, group: list[Release]) -> None:
        call_args: list[str | int] = []
        for _, _, args in group:
            call_args += args
        self.calls += 1
        sent = self._redis.send_script(_RETURN, Keys.join(keys for _, keys, _ in group), call_args)
        self.unanswered.add(sent)
        sent.add_done_callback(self.unanswered.discard)
        sent.add_done_callback(lambda done: self._done(done, group))


class Leases:
    def __init__(self, quota: Quota, redis: LeanClient, subscriber: Subscriber | None, settings: LeaseSettings) -> None:
        self._quota = quota
        self._redis = redis
        self._subscriber = subscriber
        self._channel = f"{quota.prefix}:leases"
        self._horizon = settings.horizon
        self._share = settings.share
        self._idle = settings.idle
        self._wait = settings.wait
        self._life = max(0.05, min(60.0, quota.lease_ttl / 2))  # its leases outlive it
        self._drain = min(settings.idle, quota.lease_ttl / 4)
        self._accounts: dict[tuple[str, str], Account] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._warned = -math.inf
        self.returns = ReturnBatch(redis, self._return_failed)
        redis.preload(_LEASE, _RETURN, _UNLEASE)
        self.calls = 0  # lease calls made, for the tests and the bench
        self.taken = 0  # slices taken
        self.given_back = 0
        self.admitted = 0  # requests admitted from slices

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweeping(), name="lease-sweep"))
        if self._subscriber is not None:
            self._tasks.append(loop.create_task(self._following(), name="lease-follow"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # a lease call cut short could leave its slice charged: let those in flight answer first
        calls = [a.leasing for a in self._accounts.values() if a.leasing is not None]
        if calls:
            await asyncio.wait(calls, timeout=self._wait)
        self.drop_all()
        self.returns.flush()
        if self.returns.unanswered:
            await asyncio.wait(self.returns.unanswered, timeout=self._wait)

    # ---- admission ----------------------------------------------------------------------------

    async def admit(self, key: ApiKey, model: str, reserve: int, money: int) -> Seat | None:
        """A seat in a slice of this key's budget, or None: admit this request on its own."""
        account = self._accounts.get((key.id, model))
        if account is None or account.team != key.team or account.org != key.org:  # new, or it changed team
            account = self._account(key, model, account)
        mono, now = time.monotonic(), time.time()
        account.arrive(mono, reserve, money)
        for _ in range(3):  # others may empty a new slice before this request's turn
            got = account.take(reserve, money, now, mono)
            if got is not None:
                s, lease = got
                self.admitted += 1
                left = s.requests - s.admitted
                if account.leasing is None and s.requests >= 16 and 4 * left < s.requests and len(account.open) == 1:
                    self._prefetch(account, key, model, reserve, money)
                return s, lease, self._headers(s, now)
            for s in list(account.open):
                if now >= s.until or s.full(reserve, money):
                    self._stop(account, s, mono)
            task = account.leasing
            starter = task is None
            if task is None:
                wanted = account.wanted(self._horizon, reserve, money)
                if wanted[0] < 2 or mono < self._quota._skip_until:
                    return None
                task = account.leasing = asyncio.get_running_loop().create_task(
                    self._lease(account, key, model, reserve, money, wanted)
                )
                task.add_done_callback(_retrieved)
            account.waiting += 1
            try:
                await asyncio.shield(task)
            except GatewayError:
                if starter:
                    raise
                return None  # refused for another request: this one asks on its own
            except Exception:
                return None  # Redis out of reach (counted and logged): the failure mode, on its own
            finally:
                account.waiting -= 1
            mono, now = time.monotonic(), time.time()
        return None

    def _account(self, key: ApiKey, model: str, old: Account | None) -> Account:
        if old is not None:
            for s in old.slices():
                self._give_back(s)
        levels = self._quota.levels(key)
        account = Account(key.id, model, levels, frozenset(lv.id for lv in levels), key.team, key.org)
        self._accounts[key.id, model] = account
        return account

    def _headers(self, s: Slice, now: float) -> dict[str, str]:
        if s.rpm is None and s.tpm is None:
            return {}
        tokens = s.tokens_before + s.held_tokens
        return rate_headers(s.rpm, s.requests_before + s.admitted, s.tpm, tokens, (s.minute + 1) * 60 - now)

    def _prefetch(self, account: Account, key: ApiKey, model: str, reserve: int, money: int) -> None:
        """The next slice, taken before this one runs out, so no request waits for it."""
        wanted = account.wanted(self._horizon, reserve, money)
        task = account.leasing = asyncio.get_running_loop().create_task(
            self._lease(account, key, model, reserve, money, wanted, recalls=0)
        )
        task.add_done_callback(_retrieved)

    async def _lease(
        self,
        account: Account,
        key: ApiKey,
        model: str,
        reserve: int,
        money: int,
        wanted: tuple[int, int, int, int],
        recalls: int = RECALLS,
    ) -> Slice:
        """A new slice; refused while slices are live at the refusing level, it asks for them back
        and tries again, `recalls` times (a prefetch does not: no request waits on it)."""
        try:
            for _ in range(recalls):
                try:
                    return await self._lease_once(account, key, model, reserve, money, wanted)
                except Refused as refused:
                    if not refused.live:
                        raise refused.error from None
                    # budget may sit unused in slices: ask for it back, then try again
                    await self.recall([account.levels[refused.level]], refused.live)
            try:
                return await self._lease_once(account, key, model, reserve, money, wanted)
            except Refused as refused:
                raise refused.error from None
        finally:
            account.leasing = None
            account.peak = account.in_flight

    async def _lease_once(
        self, account: Account, key: ApiKey, model: str, reserve: int, money: int, wanted: tuple[int, int, int, int]
    ) -> Slice:
        quota, levels, epoch = self._quota, account.levels, account.epoch
        now = time.time()
        win = window(now)
        sid = f"{_PREFIX}{next(_numbers):x}"
        record = f"{levels[0].base}slice:{sid}"
        tombstone = f"{levels[0].base}gone:{sid}"
        keys = [tombstone, record]
        for lv in levels:
            b = lv.base
            keys += [lv.limits, f"{b}min:{win.minute}", b + "day:" + win.day, b + "month:" + win.month]
            keys += [b + "leases", b + "slices"]
        until = min((win.minute + 1) * 60.0, now + self._life)
        ends = round((until + self._drain + 1.0) * 1000)  # past this, no live process holds it
        args: list[str | int] = [round(now * 1000), model, reserve, money, sid, quota._lease_ms, LEASE_KEEP_MS]
        args += [MINUTE_TTL, DAY_TTL, MONTH_TTL, *wanted, self._share, ends, SLICE_KEEP]
        self.calls += 1
        try:
            reply = await self._redis.run_script(_LEASE, keys, args)
        except REDIS_DOWN as exc:
            quota._failed("lease", exc)
            undo = [record, *self._window_keys(levels, win.minute, win.day, win.month), tombstone]
            quota._retry(sid, _UNLEASE, undo, [sid, TOMBSTONE_TTL])
            raise
        if quota._down:
            quota._recovered()
        if reply[0] not in (b"ok", "ok"):
            try:
                quota._decide(reply, key.id, model, reserve, sid, win, False, levels)
            except GatewayError as error:
                if len(reply) > 8:
                    raise Refused(error, int(reply[7]) - 1, list(reply[8])) from None
                raise
            raise quota_unavailable()  # decide raises for anything but ok
        expires = _text(reply[9])
        if expires:
            until = min(until, float(expires))
        rpm, tpm = (None if int(v) < 0 else int(v) for v in (reply[1], reply[3]))
        s = Slice(
            sid,
            account,
            win.minute,
            win.day,
            win.month,
            until,
            int(reply[5]),
            int(reply[6]),
            int(reply[7]),
            int(reply[8]),
            rpm,
            tpm,
            int(reply[2]),
            int(reply[4]),
            last=time.monotonic(),
        )
        account.open.append(s)
        self.taken += 1
        if account.epoch != epoch or self._accounts.get((account.key_id, account.model)) is not account:
            self._give_back(s)  # recalled (or its key moved) while the call was out: it may predate a change
        return s

    # ---- settling and giving back -------------------------------------------------------------

    async def settle(self, adm: Admission, prompt: int, completion: int, spend: int) -> bool:
        """Settles a request admitted from a slice locally; False when the slice has gone back
        already (release it on its own)."""
        s = adm.slice
        assert s is not None
        if adm.lease_id not in s.busy:
            return True  # a repeat: the first settle did what was needed
        s.account.in_flight -= 1
        if s.returned:
            del s.busy[adm.lease_id]
            return False
        s.settle(adm.lease_id, adm.reserved, adm.money, prompt, completion, spend)
        if s.stopped and not s.busy:
            await self._give_back(s)
        return True

    def _stop(self, account: Account, s: Slice, mono: float) -> None:
        account.stop(s, mono)
        if not s.busy:
            self._give_back(s)

    def _give_back(self, s: Slice) -> asyncio.Future[None]:
        """Returns what `s` did not use (sent with the returns of this loop iteration)."""
        account = s.account
        if s in account.open:
            account.open.remove(s)
        elif s in account.draining:
            account.draining.remove(s)
        s.returned = True
        self.given_back += 1
        levels = account.levels
        keys = [f"{levels[0].base}slice:{s.id}", *self._window_keys(levels, s.minute, s.day, s.month)]
        kept = list(s.busy.values())  # in flight: each keeps its lease, released on its own later
        expiry = round(time.time() * 1000) + self._quota._lease_ms
        args: list[str | int] = [len(levels), s.id, s.requests - s.admitted, s.held_tokens - s.tokens]
        args += [s.prompt, s.completion, s.held_money - s.money, s.leases, expiry, len(kept), *kept]
        return self.returns.add((s.id, Keys(keys), args))

    @staticmethod
    def _window_keys(levels: tuple[Level, ...], minute: int, day: str, month: str) -> list[str]:
        keys: list[str] = []
        for lv in levels:
            b = lv.base
            keys += [f"{b}min:{minute}", b + "day:" + day, b + "month:" + month, b + "leases", b + "slices"]
        return keys

    def _return_failed(self, release: Release, error: BaseException | None) -> None:
        if isinstance(error, (*REDIS_DOWN, TimeoutError)):
            self._quota._failed("return", error)
        sid, keys, args = release
        self._quota._retry(sid, _RETURN, keys, args)

    def sweep(self, now: float, mono: float) -> None:
        """Stops slices past their end or idle, and gives back stopped ones that are done or have
        drained long enough."""
        for name, account in list(self._accounts.items()):
            for s in list(account.open):
                if now >= s.until or mono - s.last >= self._idle:
                    account.stop(s, mono)
            for s in list(account.draining):
                if not s.busy or mono - s.stopped >= self._drain:
                    self._give_back(s)
            idle = not account.open and not account.draining and account.leasing is None
            if idle and account.in_flight <= 0 and mono - account.arrived > FORGET:
                del self._accounts[name]

    async def _sweeping(self) -> None:
        every = max(0.02, min(0.25, self._drain / 4))
        while True:
            await asyncio.sleep(every)
            self.sweep(time.time(), time.monotonic())

    # ---- recalls ------------------------------------------------------------------------------

    def drop(self, ids: Iterable[str]) -> int:
        """Gives back, at once, every slice held for any of these level ids; how many."""
        wanted = set(ids)
        dropped = 0
        for account in list(self._accounts.values()):
            if not account.ids.isdisjoint(wanted):
                account.epoch += 1  # a slice its lease call in flight brings back is given back too
                for s in account.slices():
                    self._give_back(s)
                    dropped += 1
        return dropped

    def drop_all(self) -> None:
        for account in list(self._accounts.values()):
            account.epoch += 1
            for s in account.slices():
                self._give_back(s)

    async def live(self, level: Level) -> list[Any]:
        """The slices of `level` some process holds now."""
        zset = level.base + "slices"
        return list(await self._redis.execute("ZRANGEBYSCORE", zset, f"({round(time.time() * 1000)}", "+inf"))

    async def recall(self, levels: Iterable[Level], live: list[Any] | None = None) -> bool:
        """Every slice of these levels back: this process's at once, every other process's asked
        for on the channel. Returns once the slices live now (`live`: those of the one level
        given) are back, or after `leases.wait`; False when none was live."""
        levels = list(levels)
        redis = self._redis
        waiting: dict[str, list[Any]] = {}
        found = False
        try:
            async with asyncio.timeout(self._wait):
                for lv in levels:
                    members = live if live is not None else await self.live(lv)
                    if members:
                        waiting[lv.base + "slices"] = list(members)
                if not waiting:
                    return False
                found = True
                ids = [lv.id for lv in levels]
                self.drop(ids)
                await redis.execute("PUBLISH", self._channel, " ".join(ids), key=next(iter(waiting)))
                while waiting:
                    await asyncio.sleep(POLL)
                    for zset, members in list(waiting.items()):
                        scores = await redis.execute("ZMSCORE", zset, *members)
                        left = [m for m, score in zip(members, scores, strict=True) if score is not None]
                        if left:
                            waiting[zset] = left
                        else:
                            del waiting[zset]
        except (*REDIS_DOWN, TimeoutError) as exc:
            if time.monotonic() - self._warned > 60:  # a stopped process makes every recall wait
                self._warned = time.monotonic()
                ids = [lv.id for lv in levels]
                log.warning(
                    "slices of %s not all back within %ss (%r): a process does not answer", ids, self._wait, exc
                )
        return found

    async def _following(self) -> None:
        assert self._subscriber is not None
        while True:
            try:
                async for event in self._subscriber.subscribe(self._channel):
                    if event.kind == "message" and event.data:
                        self.drop(event.data.decode(errors="replace").split())
                    elif event.kind == "subscribed":
                        self.drop_all()  # what was published meanwhile is unknown
            except Exception:
                log.exception("leases: following %s failed; starting again", self._channel)
            await asyncio.sleep(1.0)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a prefetch's refusal is nobody's to hear


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
