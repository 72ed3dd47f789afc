"""Quota admission and reconciliation: each one atomic Redis step (a Lua script, EVALSHA).

Per level of a request (the key, its team, the team's organization: gateway/access/levels.py has
where each lives), under one hash tag, so a script's keys share one Redis Cluster slot. For a key
without a team, next to its record (gateway/access/keys.py):

    gw:{id}:min:<unix minute>   HASH requests, tokens                                (TTL 2 min)
    gw:{id}:day:<YYYY-MM-DD>    HASH requests, tokens, spend, prompt_tokens, completion_tokens  (40 days)
    gw:{id}:month:<YYYY-MM>     HASH the same                                         (400 days)
    gw:{id}:leases              ZSET lease id -> expiry (unix ms), one per admitted request
    gw:{id}:bleases             ZSET the same for batch lines (never counted toward max_concurrent)
    gw:{id}:gone:<lease>        STRING, a tombstone: this admission was given up (TTL 1 h)

`spend` is money in nano-units of the pricing currency. Above the key, a level keeps a minute
window only when it has rpm or tpm, leases only when it has max_concurrent, and no prompt/completion
split (the store's spend rollups have it). The scripts are in gateway/access/quota_scripts.py.

`tokens` is committed usage plus outstanding reservations, so limits hold across any number of
replicas. A lease counts toward max_concurrent until it expires; an expired lease is kept for
LEASE_KEEP more, so a late release still reconciles, and ZREM's answer makes release idempotent.
Times are the gateway's clock (unix seconds): replicas are assumed NTP-synced.

A caller that gives up on Redis (timeout, lost connection) cannot know whether its admission
ran, or will still run: the command may sit in a socket buffer of a stalled Redis and run when it
resumes. So every abandoned admission is cancelled in the background until Redis answers: the
cancel undoes the admission if it ran, and otherwise leaves a tombstone that makes it refuse to
run later. Either order nets to nothing, so no charge and no lease outlive a refused request.
Releases that could not reach Redis are retried the same way (release is idempotent). Releases
leave in batches, those of one loop iteration in one script call (gateway/access/settle_batch.py).

A batch line (`batch=True`, ARGV[7]) is charged like any request but rpm and max_concurrent do
not apply to it: it adds no request to the minute window (which rpm reads) and its lease lives in
`bleases` (which max_concurrent does not count); its tokens count toward tpm and the budgets.

A batch line is charged once, however often it runs: a replica may die after a line's charge and
before its result is recorded, or stall while another takes the line over, and the line runs
again. Each run is admitted with the line's identity (gateway/core/request.py: BatchLine) and
its charge kept in a record next to the counters:

    gw:{id}:bline:<batch>:<line>  HASH claim, lease, settled, day, tokens, spend, prompt, completion
                                  (TTL: BatchLine.keep, pushed back with the run's lease)

Admission undoes the charge the record holds (a reservation whose lease is still held, or a
settled usage) from the windows it went to, then holds its own; the settle of the lease the
record holds turns it into the usage. A run of an older claim is refused `superseded` (the store
refuses its result too), and its late settle finds its lease gone and changes nothing. So a key is
charged, per line, the usage of the run of its latest claim (of its last attempt there): the run
whose result is recorded. The minute window (tpm) keeps every run's tokens until it passes.

Every command goes through the lean RESP client of the request path (gateway/resp/client.py, or
gateway/resp/cluster.py on a Redis Cluster).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from gateway.access.keys import REDIS_DOWN, ApiKey
from gateway.access.levels import Level, levels_of, team_levels
from gateway.access.local_limiter import LocalLimiter
from gateway.access.quota_retry import PendingOps
from gateway.access.quota_scripts import _ADMIT, _CANCEL, _RELEASE, _SETTLE, LEASE_KEEP_MS
from gateway.access.quota_scripts import DAY_TTL as DAY_TTL  # the windows' TTLs, where they were
from gateway.access.quota_scripts import MINUTE_TTL as MINUTE_TTL
from gateway.access.quota_scripts import MONTH_TTL as MONTH_TTL
from gateway.access.quota_windows import Window, rate_headers, refusal, refused_key, window
from gateway.access.settle_batch import Release, SettleBatch, settle_args
from gateway.access.slices import Slice
from gateway.core.errors import Code, GatewayError, invalid, quota_unavailable
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest, BatchLine
from gateway.resp.client import Keys, LeanClient, Script, ScriptKeys
from gateway.resp.lag import within
from gateway.settings import NANOS

if TYPE_CHECKING:
    from gateway.access.leases import Leases

log = logging.getLogger(__name__)

TOMBSTONE_TTL = 3600
MAX_CACHED_KEYS = 10_000  # levels whose keys are kept for the current minute
RECALLS = 3  # with leases, a refusal while slices are live asks for them back at most this often
# Lease ids: unique per process (a random prefix) and cheap (a counter): os.urandom per request
# showed in profiles, and a lease id needs to be unique, not secret.
_LEASE_PREFIX = secrets.token_hex(6)
_lease_numbers = itertools.count()


@dataclass
class Admission:
    key_id: str
    lease_id: str
    reserved: int
    minute: int
    day: str
    month: str
    headers: dict[str, str] = field(default_factory=dict)
    local: bool = False  # admitted by the per-process limiter while Redis was unreachable
    batch: bool = False  # a batch line: its lease is in `bleases`
    levels: tuple[Level, ...] = ()  # where it was reserved, key first (gateway/access/levels.py)
    money: int = 0  # the money reserved, in nano-units of the pricing currency
    keys: Keys | None = None  # release_keys(), when made at admission
    line: BatchLine | None = None  # a batch line: `record` is its charge record
    record: str = ""
    slice: Slice | None = None  # admitted from this leased slice (gateway/access/leases.py)

    @property
    def leases(self) -> str:
        return "bleases" if self.batch else "leases"

    def release_keys(self) -> Keys:
        if self.keys is None:
            self.keys = settle_keys(self.levels, self.leases, self.minute, self.day, self.month)
        return self.keys


def admit_keys(levels: tuple[Level, ...], leases: str, minute: int, day: str, month: str) -> Keys:
    """The admission script's keys but the tombstone: 5 a level (gateway/access/quota_scripts.py)."""
    names: list[str] = []
    for lv in levels:
        b = lv.base
        names += [lv.limits, f"{b}min:{minute}", b + "day:" + day, b + "month:" + month, b + leases]
    return Keys(names)


def settle_keys(levels: tuple[Level, ...], leases: str, minute: int, day: str, month: str) -> Keys:
    """The release script's keys: 4 a level."""
    names: list[str] = []
    for lv in levels:
        b = lv.base
        names += [b + leases, f"{b}min:{minute}", b + "day:" + day, b + "month:" + month]
    return Keys(names)


def admit_args(
    now_ms: int, model: str, reserve: int, lease_id: str, lease_ms: int, batch: bool = False, money: int = 0
) -> list[str | int]:
    """The admission script's ARGV (gateway/access/quota_scripts.py), its numbers worked out here."""
    return [now_ms, model, reserve, lease_id, now_ms + lease_ms, lease_ms + LEASE_KEEP_MS, "1" if batch else "0", money]


def reservation(key: ApiKey, request: ApiRequest, prompt_tokens: int) -> int:
    """What a request may spend at most: its prompt plus max_tokens for every choice and prompt.

    A request whose reservation exceeds a token limit of the key could never be admitted, so it
    is a 400 that says why, not a 429 a client would retry forever.
    """
    if request.endpoint.kind == "embeddings":
        reserve = prompt_tokens  # an embedding writes nothing: max_tokens and n mean nothing here
    else:
        reserve = prompt_tokens + (request.max_tokens or 0) * request.n * request.prompts
    for name, limit in (("tpm", key.tpm), ("daily_tokens", key.daily_tokens), ("monthly_tokens", key.monthly_tokens)):
        if limit is not None and reserve > limit:
            raise invalid(
                f"This request reserves {reserve} tokens (prompt {prompt_tokens} + max_tokens x n), more than "
                f"this key's {name} limit of {limit}: it can never be admitted. Lower max_tokens or n.",
                param="max_tokens",
                code=Code.INVALID_REQUEST,
            )
    return reserve


class Quota:
    def __init__(
        self,
        redis: LeanClient,
        prefix: str = "gw",
        *,
        lease_ttl: float = 300.0,
        failure_mode: str = "closed",
        redis_timeout: float = 0.25,
        breaker: float = 1.0,
        metrics: GatewayMetrics | None = None,
        currency: str = "USD",
    ) -> None:
        if failure_mode not in ("closed", "open"):
            raise ValueError(f"failure_mode must be 'closed' or 'open', not {failure_mode!r}")
        self.redis = redis
        self.currency = currency
        redis.preload(_ADMIT, _RELEASE, _CANCEL, _SETTLE)
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.failure_mode = failure_mode
        self.deadline = 2 * redis_timeout  # bounds a whole call, reconnecting included
        self.admin_deadline = redis_timeout  # bounds an admin read (usage, history)
        self.breaker = breaker  # after a Redis failure, skip Redis this long (seconds)
        self.local = LocalLimiter()
        self.redis_errors = 0
        self.fail_open_admissions = 0
        self._metrics = metrics
        self._lease_ms = max(1, round(lease_ttl * 1000))
        self._skip_until = 0.0
        self._down = False
        self._pending = PendingOps(redis, 4 * self.deadline)  # cancels and releases waiting for Redis
        self.settles = SettleBatch(redis, self._release_failed)  # releases of one loop iteration, one call
        self._keys_minute = -1
        self._window_keys: dict[tuple[int, bool], tuple[tuple[Level, ...], Keys, Keys]] = {}
        self.leases: Leases | None = None  # leased budgets, when on (gateway/access/leases.py)

    def _keys(self, levels: tuple[Level, ...], win: Window, batch: bool) -> tuple[Keys, Keys]:
        """A request's keys for admission (but its tombstone) and settle: the same for every request
        of these levels in this minute, so made and packed once a minute."""
        if win.minute != self._keys_minute:
            self._keys_minute = win.minute
            self._window_keys.clear()
        found = self._window_keys.get((id(levels), batch))
        if found is not None and found[0] is levels:
            return found[1], found[2]
        if len(self._window_keys) >= MAX_CACHED_KEYS:
            self._window_keys.clear()
        leases = "bleases" if batch else "leases"
        admitting = admit_keys(levels, leases, win.minute, win.day, win.month)
        settling = settle_keys(levels, leases, win.minute, win.day, win.month)
        # keyed by identity (levels_of returns the same tuple for a key), kept alive by the entry
        self._window_keys[(id(levels), batch)] = (levels, admitting, settling)
        return admitting, settling

    def levels(self, key: ApiKey) -> tuple[Level, ...]:
        if key.kind == "team" and key.team is not None:
            return team_levels(self.prefix, key.team, key.org)
        return levels_of(self.prefix, key.id, key.team, key.org)

    def start(self) -> None:
        if self.leases is not None:
            self.leases.start()

    async def admit(
        self,
        key: ApiKey,
        model: str,
        reserve_tokens: int,
        now: float | None = None,
        *,
        batch: bool = False,
        money: int = 0,
        line: BatchLine | None = None,
    ) -> Admission:
        """Checks every limit of every level (key, team, organization) and reserves `reserve_tokens`
        and `money` (nano-units) at each. `batch`: a batch line, to which rpm and max_concurrent do
        not apply; it never falls back to the per-process limiter (it waits for Redis instead).
        `line`: which batch line, whose earlier runs' charge this one replaces."""
        if reserve_tokens < 0 or money < 0:
            raise ValueError("reserve_tokens and money must be >= 0")
        if self.leases is not None and now is None and not batch:
            return await self._leased(key, model, reserve_tokens, money)
        now = time.time() if now is None else now
        win = window(now)
        lease_id = f"{_LEASE_PREFIX}{next(_lease_numbers):x}"
        if time.monotonic() >= self._skip_until:
            levels = self.levels(key)
            tag = levels[0].base  # every level shares the key's hash tag
            tombstone = f"{tag}gone:{lease_id}"
            admitting, settling = self._keys(levels, win, batch)
            keys = admitting.after(tombstone)
            args = admit_args(round(now * 1000), model, reserve_tokens, lease_id, self._lease_ms, batch, money)
            record = ""
            if line is not None:
                record = f"{tag}bline:{line.batch_id}:{line.line}"
                keys = Keys([*keys, record])
                args += [line.claim, line.keep, win.day]
            try:
                # No timer per call: the client drops a connection on which Redis stopped answering.
                reply = await self.redis.run_script(_ADMIT, keys, args)
            except REDIS_DOWN as exc:
                self._failed("admit", exc)
                adm = Admission(key.id, lease_id, reserve_tokens, win.minute, win.day, win.month, batch=batch)
                adm.levels, adm.money, adm.keys = levels, money, settling
                cancel_args: list[str | int] = [lease_id, reserve_tokens, TOMBSTONE_TTL, int(batch), money]
                self._retry(lease_id, _CANCEL, [*adm.release_keys(), tombstone], cancel_args)
            else:
                if self._down:
                    self._recovered()
                adm = self._decide(reply, key.id, model, reserve_tokens, lease_id, win, batch, levels)
                adm.money, adm.keys, adm.line, adm.record = money, settling, line, record
                return adm
        if batch:
            raise quota_unavailable()
        return self._admit_without_redis(key, model, reserve_tokens, now, win, lease_id)

    async def _leased(self, key: ApiKey, model: str, reserve: int, money: int) -> Admission:
        """A busy key's request admitted from a slice of its budget this process holds
        (gateway/access/leases.py); any other on its own (`admit` with `now`), and a refusal while
        other processes hold slices of the key asks for them back and tries again."""
        assert self.leases is not None
        seat = await self.leases.admit(key, model, reserve, money)
        if seat is not None:
            s, lease_id, headers = seat
            adm = Admission(key.id, lease_id, reserve, s.minute, s.day, s.month, headers)
            adm.levels, adm.money, adm.slice = s.account.levels, money, s
            return adm
        for _ in range(RECALLS):
            try:
                return await self.admit(key, model, reserve, time.time(), money=money)
            except GatewayError as refused:
                if refused.status != 429 or not await self.leases.recall([refusing(self.levels(key), refused.code)]):
                    raise
        return await self.admit(key, model, reserve, time.time(), money=money)

    def _decide(
        self,
        reply: list[Any],
        key_id: str,
        model: str,
        reserve: int,
        lease_id: str,
        win: Window,
        batch: bool,
        levels: tuple[Level, ...],
    ) -> Admission:
        status = _text(reply[0])
        if status == "cancelled":  # cannot happen to a caller still waiting; refuse all the same
            raise quota_unavailable()
        if len(reply) < 5:
            raise refused_key(status, model, float(_text(reply[1])) if len(reply) > 1 else None)
        rpm, tpm = (None if v < 0 else int(v) for v in (reply[1], reply[3]))
        headers = rate_headers(rpm, int(reply[2]), tpm, int(reply[4]), win.minute_left)
        if status != "ok":
            level = levels[int(reply[7]) - 1]
            raise refusal(status, level.kind, int(reply[5]), int(reply[6]), reserve, win, headers, self.currency)
        adm = Admission(key_id, lease_id, reserve, win.minute, win.day, win.month, headers, batch=batch)
        adm.levels = levels
        return adm

    def _admit_without_redis(
        self, key: ApiKey, model: str, reserve: int, now: float, win: Window, lease_id: str
    ) -> Admission:
        if self.failure_mode == "closed":
            raise quota_unavailable()
        headers = self.local.admit(key, model, reserve, now, win, lease_id)
        self.fail_open_admissions += 1
        if self._metrics is not None:
            self._metrics.fail_open.inc()
        return Admission(key.id, lease_id, reserve, win.minute, win.day, win.month, headers, local=True)

    async def release(self, adm: Admission, prompt_tokens: int, completion_tokens: int, spend: int = 0) -> None:
        """Replace the reservation by the actual usage (tokens, and `spend` in nano-units) at every
        level. Idempotent: a repeat changes nothing.

        Batched, sent, not waited for: the releases of one loop iteration leave in one script call
        (gateway/access/settle_batch.py), and this returns once that call has been handed to the
        connection. The request path only needs it to reach Redis before the client's next
        request, and commands of one connection run in order. A failure is retried in the
        background; meanwhile the reservation stays counted (the safe side)."""
        if adm.local:
            self.local.release(adm.lease_id, prompt_tokens + completion_tokens)
            return
        leases = self.leases
        if (
            adm.slice is not None
            and leases is not None
            and await leases.settle(adm, prompt_tokens, completion_tokens, spend)
        ):
            return
        delta = prompt_tokens + completion_tokens - adm.reserved
        args: list[str | int] = [adm.lease_id, delta, prompt_tokens, completion_tokens, spend - adm.money]
        keys = adm.release_keys()
        if adm.line is not None:
            keys = Keys([*keys, adm.record])
        sent = self.settles.add((adm.lease_id, keys, args))
        # Shared by the loop iteration's releases: a cancelled waiter would cancel it for all of
        # them. A job aborting its batch lines cancels them (a client's request is not cancelled
        # while it settles: its watch has stopped).
        await (asyncio.shield(sent) if adm.batch else sent)

    def _release_failed(self, release: Release, error: BaseException | None) -> None:
        if isinstance(error, (*REDIS_DOWN, TimeoutError)):  # TimeoutError: the send was cancelled
            self._failed("release", error)
        # NOSCRIPT (Redis restarted) or Redis unreachable: run_script in the retry loads the script
        lease_id, keys, args = release
        self._retry(lease_id, _SETTLE, keys, settle_args(keys, args))

    def _retry(self, lease_id: str, script: Script, keys: ScriptKeys, args: list[str | int]) -> None:
        self._pending.add(lease_id, script, keys, args)

    async def flush_pending(self) -> bool:
        """Runs the cancels and releases that wait for Redis now; True when none is left."""
        return await self._pending.flush()

    async def close(self) -> None:
        """Stops the retries after one last try (a shutdown reconciles what it can)."""
        if self.leases is not None:
            await self.leases.close()
        self.settles.flush()
        await self._pending.close()

    async def refresh_leases(self, adms: Iterable[Admission]) -> None:
        """Push back the expiry of in-flight leases (call every lease_ttl / 3 for long streams)."""
        expiry = round(time.time() * 1000) + self._lease_ms
        keep = self._lease_ms + LEASE_KEEP_MS
        calls = []
        for adm in adms:
            if not adm.local:
                for lv in adm.levels:
                    leases = lv.base + adm.leases
                    # XX: never revive a released lease
                    calls.append(self.redis.execute("ZADD", leases, "XX", expiry, adm.lease_id))
                    calls.append(self.redis.execute("PEXPIRE", leases, keep))
                if adm.line is not None:  # a batch line's charge record outlives its run
                    calls.append(self.redis.execute("EXPIRE", adm.record, adm.line.keep))
        if not calls:
            return
        try:
            async with within(self.deadline):
                await asyncio.gather(*calls)  # issued together: one write, one round trip
        except (*REDIS_DOWN, TimeoutError) as exc:
            self._failed("refresh_leases", exc, trip=False)

    def _level(self, of: str | Level) -> Level:
        """A key id stands for a key without a team; a Level for anything else."""
        return of if isinstance(of, Level) else levels_of(self.prefix, of, None, None)[0]

    async def recall(self, levels: Iterable[Level]) -> None:
        """After a change of these levels' records (a revoke, new limits): once this returns, no
        process admits from a slice taken before it (gateway/access/leases.py has the bound)."""
        if self.leases is not None:
            await self.leases.recall(levels)

    async def _recall_before_read(self, level: Level, op: str) -> None:
        """With leases on, the slices of `level` back before a read of its counters. A Redis that
        does not answer which slices are live within the admin deadline will not answer the
        read either: 503 at once."""
        if self.leases is None:
            return
        try:
            async with within(self.admin_deadline):
                live = await self.leases.live(level)
        except (*REDIS_DOWN, TimeoutError) as exc:
            self._failed(op, exc, trip=False)
            raise quota_unavailable() from None
        if live:
            await self.leases.recall((level,), live)

    async def usage(self, of: str | Level, now: float | None = None) -> dict[str, Any]:
        """The current windows of a key (its id, when it has no team) or of any level; with
        leases on, slices of it are given back first, so what they admitted is in."""
        win = window(time.time() if now is None else now)
        level = self._level(of)
        await self._recall_before_read(level, "usage")
        base, key_id = level.base, level.id
        fields = ("requests", "tokens", "prompt_tokens", "completion_tokens", "spend")
        try:
            async with within(self.admin_deadline):
                day, month, minute = await asyncio.gather(
                    self.redis.execute("HMGET", base + "day:" + win.day, *fields),
                    self.redis.execute("HMGET", base + "month:" + win.month, *fields),
                    self.redis.execute("HMGET", f"{base}min:{win.minute}", "requests", "tokens"),
                )
        except (*REDIS_DOWN, TimeoutError) as exc:
            self._failed("usage", exc, trip=False)
            raise quota_unavailable() from None
        return {
            "id": key_id,
            "day": {"date": win.day, **_money(_counts(fields, day))},
            "month": {"month": win.month, **_money(_counts(fields, month))},
            "minute": _counts(("requests", "tokens"), minute),
            "currency": self.currency,
        }

    async def history(self, of: str | Level, days: int, now: float | None = None) -> list[dict[str, Any]]:
        """Usage of the last `days` UTC days (today included), oldest first, from the day hashes.
        A day with no hash (no use, or older than DAY_TTL) counts zero."""
        today = date.fromisoformat(window(time.time() if now is None else now).day)
        dates = [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]
        level = self._level(of)
        await self._recall_before_read(level, "history")
        base = level.base
        fields = ("requests", "prompt_tokens", "completion_tokens", "tokens", "spend")
        try:
            async with within(self.admin_deadline):
                rows = await asyncio.gather(*(self.redis.execute("HMGET", base + "day:" + d, *fields) for d in dates))
        except (*REDIS_DOWN, TimeoutError) as exc:
            self._failed("history", exc, trip=False)
            raise quota_unavailable() from None
        return [{"date": day, **_money(_counts(fields, row))} for day, row in zip(dates, rows, strict=True)]

    def _failed(self, op: str, exc: BaseException, trip: bool = True) -> None:
        """Counts a Redis failure; `trip`: the breaker opens (admissions skip Redis a while). Only
        the admission path trips it: an admin read or a lease refresh that timed out says little
        about Redis and must not refuse every request for a second."""
        self.redis_errors += 1
        if self._metrics is not None:
            self._metrics.redis_errors.inc()
        if not trip:
            log.warning("a Redis call failed (%s: %r)", op, exc)
            return
        self._skip_until = time.monotonic() + self.breaker
        if not self._down:  # one line when Redis goes away, one when it is back (_recovered)
            self._down = True
            mode = "fail-open, per-process limits" if self.failure_mode == "open" else "fail-closed, refusing requests"
            log.warning("Redis unreachable: quotas %s (%s: %r)", mode, op, exc)

    def _recovered(self) -> None:
        self._down = False
        log.warning("Redis reachable again: quotas back on Redis")


def refusing(levels: tuple[Level, ...], code: str | None) -> Level:
    """The level a 429's code names: team_rpm_exceeded -> the team; rpm_exceeded -> the first."""
    kind = (code or "").partition("_")[0]
    return next((lv for lv in levels if lv.kind == kind), levels[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counts(names: Iterable[str], values: list[Any]) -> dict[str, int]:
    return {name: int(v) if v is not None else 0 for name, v in zip(names, values, strict=True)}


def _money(counts: dict[str, Any]) -> dict[str, Any]:
    """`spend` in nano-units -> in the currency (outstanding reservations included, as `tokens`)."""
    counts["spend"] = counts.get("spend", 0) / NANOS
    return counts


__all__ = ["Admission", "GatewayError", "Quota", "reservation"]
