"""A lean Redis client for the request path: one pipelined connection, replies parsed by hiredis.

redis-py's asyncio client costs 120-200 us of CPU per command here (pool checkout, stream reader,
per-read timeouts), which alone would be more than the quota budget of a request. This client
writes each command straight to one asyncio transport and matches replies to waiting futures in
order, so concurrent requests share the connection (Redis answers in order) for ~20 us each.
It runs only the quota scripts (EVALSHA, falling back to EVAL once on NOSCRIPT); everything else
(admin API, key store, route store) stays on redis-py. `gateway/resp/cluster.py` puts one of these
per node behind a Redis Cluster slot map.

A command leaves only if its caller is still waiting when the write happens: one that gave up
(a timeout cancelled it) before that is dropped, never sent late. Errors say whether the command
may have run: `CommandNotSent` (nothing left: safe to send elsewhere) or a plain ConnectionError
(the connection died after the write: it may have run, so it is never replayed here), except
`RedisStalled`: a connection this client dropped because Redis went silent; the command is sent
once more on a fresh connection before the caller hears of it (every command sent here is
idempotent), so one slow moment is not an outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.resp.lag import lag_meter


class CommandNotSent(RedisConnectionError):
    """The command never left this process (no connection, or it died first): safe to retry."""


class RedisStalled(RedisConnectionError):
    """The connection was dropped because Redis sent nothing for the stall timeout."""


class RedisNotReady(RedisConnectionError):
    """Redis answered but cannot serve yet: a restarted server still loading its data (`LOADING`),
    a replica without its master (`MASTERDOWN`). Out of reach for the caller, like a closed port:
    the quota's failure mode applies, not a 500."""


NOT_READY = ("LOADING", "MASTERDOWN")


def pack(*args: bytes | str | int | float) -> bytes:
    # hiredis packs in C: three times faster than the loop below, which matters for the admission
    # script's keys (5 per limited level); the loop stays for what hiredis refuses (a bool)
    try:
        return bytes(hiredis.pack_command(args))  # type: ignore[arg-type]  # its stub types a 1-tuple
    except TypeError:
        pass
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_ASKING = pack("ASKING")


def _bulks(items: Sequence[bytes | str | int | float]) -> bytes:
    """`items` as RESP bulk strings without the array header: a stretch of a command."""
    data = pack(*items)
    return data[data.index(b"\r\n") + 2 :]


class Keys:
    """A script's keys, packed once. Packing costs about 0.15 us a key, and the quota scripts send
    the same keys with every request (a level's, in the current minute: 5 a level), so the caller
    packs them when it makes them and keeps them (gateway/access/quota.py)."""

    __slots__ = ("names", "packed")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self.packed = _bulks(self.names) if self.names else b""

    @classmethod
    def join(cls, parts: Iterable[ScriptKeys]) -> Keys:
        """These keys one after the other (a plain sequence of names is packed now)."""
        names: list[str] = []
        chunks: list[bytes] = []
        for part in parts:
            keys = part if isinstance(part, Keys) else Keys(part)
            names += keys.names
            chunks.append(keys.packed)
        return cls._made(tuple(names), b"".join(chunks))

    def after(self, key: str) -> Keys:
        """`key`, then these."""
        data = key.encode()
        return self._made((key, *self.names), b"$%d\r\n%s\r\n%s" % (len(data), data, self.packed))

    @classmethod
    def _made(cls, names: tuple[str, ...], packed: bytes) -> Keys:
        keys = cls.__new__(cls)
        keys.names, keys.packed = names, packed
        return keys

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


ScriptKeys = Sequence[str] | Keys


_heads: dict[tuple[str, str], bytes] = {}  # (EVALSHA, sha) or (EVAL, source) packed: one per script


def script_command(command: str, body: str, keys: ScriptKeys, args: Sequence[Any]) -> bytes:
    """EVALSHA sha or EVAL source, then the keys and the arguments, packed."""
    if not isinstance(keys, Keys):
        return pack(command, body, len(keys), *keys, *args)
    head = _heads.get((command, body))
    if head is None:
        head = _heads[(command, body)] = _bulks((command, body))
    count = len(keys.names)
    digits = b"%d" % count
    tail = _bulks(args) if args else b""
    return b"*%d\r\n%s$%d\r\n%s\r\n%s%s" % (3 + count + len(args), head, len(digits), digits, keys.packed, tail)


class _Protocol(asyncio.Protocol):
    """One connection. A stall watchdog stands in for a timeout per call: when commands wait and
    Redis has sent nothing for `stall_timeout` seconds, the connection is dropped and every waiting
    call fails. Progress, not the wait of one call, is what counts: a burst that keeps this process
    busy (its replies read late) is not mistaken for a Redis that stopped answering, and the hot
    path arms no timer per command. Redis's silence is measured from the write of the oldest
    command waiting (or the last reply since), less the loop's own lag (gateway/resp/lag.py); and
    before the connection is dropped the loop makes one more pass, in which a reply already in
    the socket is read."""

    def __init__(self, stall_timeout: float = 0.5) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost = False
        self.stall_timeout = stall_timeout
        self._heard = 0.0  # loop time of the last reply, or of the write that found nothing waiting
        self._meter = lag_meter()
        self._heard_lag = 0.0  # the meter's lag at `_heard`
        self._confirming = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._stalled = False
        # (command, its caller's future, preceded by ASKING): sent at the end of this loop iteration
        self._outbox: list[tuple[bytes, asyncio.Future[Any], bool]] = []
        self._discard: asyncio.Future[Any] | None = None  # a done future: the reply to ASKING is dropped

    def send(self, data: bytes, future: asyncio.Future[Any], asking: bool = False) -> None:
        """Commands issued in the same loop iteration leave in one write (one syscall)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((data, future, asking))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.transport is None or self.lost:
            _fail(outbox, "Redis connection lost before the command was sent")
            return
        chunks = []
        if not self.waiting:
            self._hear(asyncio.get_running_loop().time())
        for data, future, asking in outbox:
            if future.done():  # its caller gave up before it left: never send it late
                continue
            if asking:
                if self._discard is None:
                    self._discard = future.get_loop().create_future()
                    self._discard.set_result(None)
                self.waiting.append(self._discard)
                chunks.append(_ASKING)
            self.waiting.append(future)
            chunks.append(data)
        if chunks:
            self.transport.write(b"".join(chunks))
            if self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_at(self._heard + self.stall_timeout, self._check)

    def _hear(self, now: float) -> None:
        self._heard = now
        self._heard_lag = self._meter.lag
        self._confirming = False

    def _check(self) -> None:
        self._watchdog = None
        if not self.waiting or self.lost or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        silent = now - self._heard - (self._meter.lag - self._heard_lag)
        if silent < self.stall_timeout:
            self._watchdog = loop.call_at(now + self.stall_timeout - silent, self._check)
            return
        if not self._confirming:
            # A timer due now runs after the next poll's reads: a reply already here clears this
            self._confirming = True
            self._watchdog = loop.call_at(now, self._check)
            return
        self._stalled = True
        self.transport.abort()  # connection_lost fails every waiting call

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._hear(asyncio.get_running_loop().time())
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():  # a caller that timed out has gone: its reply is dropped
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        why = f"Redis answered nothing for {self.stall_timeout}s" if self._stalled else f"{exc or 'closed'}"
        error = RedisStalled if self._stalled else RedisConnectionError
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error(f"Redis connection lost: {why}"))
        outbox, self._outbox = self._outbox, []
        _fail(outbox, f"Redis connection lost before the command was sent: {exc or 'closed'}")


def _fail(outbox: list[tuple[bytes, asyncio.Future[Any], bool]], why: str) -> None:
    for _, future, _ in outbox:
        if not future.done():
            future.set_exception(CommandNotSent(why))


class RespClient:
    def __init__(self, url: str, connect_timeout: float) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError("the lean client takes redis:// or rediss:// URLs")
        # rediss://: TLS, the server's certificate verified against the system's CAs (or SSL_CERT_FILE)
        self._tls = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int(parsed.path.lstrip("/") or 0)
        self._user = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._scripts: list[Script] = []

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and not self._proto.lost:
                return self._proto
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    # A try waits redis.timeout of Redis's silence; a stalled one gets a second
                    # try on a fresh connection (execute), so a call ends within two
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self._connect_timeout), self._host, self._port, ssl=self._tls
                    )
            except (OSError, TimeoutError) as exc:
                raise CommandNotSent(f"cannot connect to Redis at {self._host}:{self._port}: {exc}") from None
            self._proto = proto
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                await self.execute("AUTH", *auth)
            if self._db:
                await self.execute("SELECT", self._db)
            for script in self._scripts:  # before anything else sent on this connection
                loaded: asyncio.Future[Any] = loop.create_future()
                loaded.add_done_callback(_quiet)
                proto.send(pack("SCRIPT", "LOAD", script.source), loaded)
            return proto

    def preload(self, *scripts: Script) -> None:
        """Load these scripts on every (re)connection, so an EVALSHA sent without waiting (a
        release) never meets NOSCRIPT after Redis restarted."""
        self._scripts = [*self._scripts, *scripts]

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    async def execute(self, *args: bytes | str | int | float, key: bytes | str | None = None) -> Any:
        """One command; `key` routes it on a cluster client and means nothing here. A command whose
        connection was dropped for silence is sent once more, on a fresh connection, before Redis
        counts as down: every command this client runs may run twice (the quota scripts are
        idempotent by lease id; the rest are reads and idempotent writes)."""
        return await self.execute_packed(pack(*args))

    async def execute_packed(self, command: bytes) -> Any:
        """execute() of a command already packed."""
        try:
            return await self._execute(command)
        except RedisStalled:
            return await self._execute(command)

    async def _execute(self, command: bytes, asking: bool = False) -> Any:
        proto = await self._connection()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.send(command, future, asking)
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.startswith(NOT_READY):
                raise RedisNotReady(text)
            raise ResponseError(text)
        return reply

    async def execute_asking(self, *args: bytes | str | int | float) -> Any:
        """ASKING and the command in one write, so no other command can slip in between (a
        Redis Cluster ASK redirect)."""
        return await self.execute_asking_packed(pack(*args))

    async def execute_asking_packed(self, command: bytes) -> Any:
        return await self._execute(command, asking=True)

    def send_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> asyncio.Future[Any]:
        """EVALSHA without waiting: the future gets the reply (a hiredis.ReplyError too, NOSCRIPT
        included; the caller retries those with run_script). Commands on one connection run in
        the order they were sent, so a later command of this client sees this one done."""
        command = script_command("EVALSHA", script.sha, keys, args)
        proto = self._proto
        if proto is None or proto.lost:
            return asyncio.ensure_future(self.execute_packed(command))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.send(command, future)
        return future

    async def run_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> Any:
        try:
            return await self.execute_packed(script_command("EVALSHA", script.sha, keys, args))
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # loads it for next time
            return await self.execute_packed(script_command("EVAL", script.source, keys, args))

    async def close(self) -> None:
        self.close_after(0)

    def close_after(self, delay: float) -> None:
        """Close the connection `delay` seconds from now (replies in flight may still arrive)."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return
        if delay <= 0:
            proto.transport.close()
        else:
            asyncio.get_running_loop().call_later(delay, proto.transport.close)


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: nobody waits for it, and a failure shows on the next call


class LeanClient(Protocol):
    """What the quota path needs: RespClient on one Redis, ClusterClient on a Redis Cluster."""

    async def execute(self, *args: bytes | str | int | float, key: bytes | str | None = None) -> Any:
        """One command; on a cluster it goes to the master of `key` (default: the first argument
        after the command name, the first key of every command the quota path sends)."""
        ...

    async def run_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> Any: ...

    def send_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> asyncio.Future[Any]:
        """Runs a script without waiting for it: a future of its reply (errors included)."""
        ...

    def preload(self, *scripts: Script) -> None:
        """Load these scripts on every connection before anything else is sent on it."""
        ...

    async def close(self) -> None: ...


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
