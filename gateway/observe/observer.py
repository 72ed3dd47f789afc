"""The one object the request path talks to: begins and ends a request's observation.

`Observer.build` answers None when the access log, tracing and Server-Timing are all off, and
the request path then checks `gw.observe is None` once and does nothing else: no observation,
no span, no context variable. A request the access log samples out and tracing does not cover
gets no observation either.

What is observed of one request (`Observation`) is filled as it goes and read once at its end
(access log, spans).

The front middleware (or the batch runner, for a batch line) makes one `Observation` and puts it
in `CURRENT`; the exchange finds it there and notes what only it knows (key, route, engine,
tokens, when admission, the queue and the upstream call began and ended). Times are
`time.perf_counter()` readings; `wall` maps them to the epoch for the spans.

The client's address (`ClientAddress`) is the peer's, or from `X-Forwarded-For` when the peer is
a trusted proxy.

Anyone can send X-Forwarded-For, so it is read only when the connection comes from a configured
proxy (`logging.trusted_proxies`), right to left: each hop a trusted proxy appended is skipped,
and the first address no trusted proxy vouches for is the client (what nginx's
`real_ip_recursive on` does). A malformed entry stops the walk at the last good hop.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from starlette.types import Scope

from gateway.core.metrics import GatewayMetrics
from gateway.observe.access_log import AccessLog
from gateway.settings import Settings


@dataclass(slots=True, eq=False)
class Observation:
    request_id: str
    method: str = "POST"
    path: str = ""
    client: str | None = None
    api: str | None = None  # chat, completions, embeddings, ...; a short name for other routes
    wall: float = field(default_factory=time.time)  # epoch seconds at `started`
    started: float = field(default_factory=time.perf_counter)
    # who and what (the exchange)
    key_id: str | None = None
    team: str | None = None
    priority: str | None = None
    model: str | None = None
    response_model: str | None = None  # the model the engine was asked for (the route's)
    route: str | None = None
    engine: str | None = None
    batch_id: str | None = None
    stream: bool = False
    # the outcome
    status: int = 0
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    ttft: float | None = None  # seconds
    duration: float = 0.0
    bytes_out: int = 0
    hung_up: bool = False
    # marks on the way (perf_counter; 0.0: did not happen)
    admit_start: float = 0.0
    admit_end: float = 0.0
    limits: str | None = None  # the limits admission checked, as the grant's headers name them
    queue_start: float = 0.0
    queue_end: float = 0.0
    queue_position: int = 0  # requests waiting ahead in the gateway when this one asked
    cold_start: tuple[float, float] | None = None
    upstream_start: float = 0.0
    upstream_headers: float = 0.0
    upstream_end: float = 0.0
    settle_start: float = 0.0
    settle_end: float = 0.0
    scores: tuple[tuple[str, float], ...] = ()
    trace: Any = None  # the request's spans (gateway/observe/spans.py), when it is traced
    logged: bool = False  # the access log writes its line (sampling)

    @property
    def trace_id(self) -> str | None:
        return self.trace.trace_id if self.trace is not None else None

    def note_caller(self, key_id: str | None, key: Any, priority: str) -> None:
        self.key_id, self.priority = key_id, priority
        self.team = getattr(key, "team", None)  # the key's team, where keys have one

    def note_request(self, key_id: str | None, key: Any, priority: str, request: Any) -> None:
        self.note_caller(key_id, key, priority)
        self.model, self.api, self.stream = request.model, request.endpoint.kind, request.stream
        self.batch_id = request.batch_id

    def note_admitted(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Admission's end, and which limits it checked (the rate-limit headers it set)."""
        self.admit_end = time.perf_counter()
        prefix = b"x-ratelimit-limit-"
        limits = [k[len(prefix) :].decode() for k, _ in headers if k.startswith(prefix)]
        self.limits = ",".join(limits) if limits else None

    def note_queue(self, waiting: int) -> None:
        self.queue_start = time.perf_counter()
        self.queue_position = waiting

    def note_upstream(self, route: str, engine: str, model: str, scores: tuple[tuple[str, float], ...]) -> bytes:
        """An upstream call begins; answers the header lines that carry the trace to the engine."""
        self.route, self.engine, self.response_model, self.scores = route, engine, model, scores
        self.upstream_start = time.perf_counter()
        self.upstream_headers = 0.0
        return self.trace.upstream(self) if self.trace is not None else b""

    def note_outcome(
        self, status: int, error_code: Any, usage: Any, ttft: float | None, finish: str | None, gone: bool
    ) -> None:
        self.status = status
        if error_code is not None:
            self.error_code = str(error_code)
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.ttft, self.finish_reason, self.hung_up = ttft, finish, gone
        if self.upstream_start and not self.upstream_end:
            self.upstream_end = self.settle_start or time.perf_counter()

    def exemplar(self) -> str | None:
        """The trace id for the metrics' exemplars: only of a sampled (exported) trace."""
        trace = self.trace
        return trace.trace_id if trace is not None and trace.recording else None

    def epoch_ns(self, mark: float) -> int:
        """A perf_counter reading as epoch nanoseconds (what spans carry)."""
        return int((self.wall + (mark - self.started)) * 1e9)


CURRENT: ContextVar[Observation | None] = ContextVar("gateway_observation", default=None)


def current() -> Observation | None:
    return CURRENT.get()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self._trusted = lru_cache(maxsize=1024)(self._check)

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self._networks)

    def of(self, scope: Scope) -> str | None:
        peer = scope.get("client")
        host = peer[0] if peer else None
        if not self._networks or host is None or not self._trusted(host):
            return host
        forwarded = [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
        if not forwarded:
            return host
        hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",")]
        client = host
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # not an address: nothing left of it is believable
            client = hop
            if not self._trusted(hop):
                break
        return client


# The short `api` name of a path that is not an inference endpoint (those name their own).
_APIS = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/files", "files"),
    ("/v1/batches", "batches"),
    ("/v1/models", "models"),
    ("/v1/", "other"),
    ("/admin/", "admin"),
    ("/ui", "console"),
    ("/health", "health"),
    ("/ready", "health"),
    ("/metrics", "metrics"),
)
UNTRACED = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: no trace of their own


def api_of(path: str) -> str:
    for prefix, name in _APIS:
        if path.startswith(prefix):
            return name
    return "other"


class Observer:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        logging = settings.logging
        self.access = AccessLog(logging.access) if logging.access.enabled else None
        self._sample = logging.access.sample
        self.tracing: Any = None
        if settings.tracing.enabled:
            from gateway.observe.tracing import Tracing  # the SDK is imported only when tracing is on

            self.tracing = Tracing(settings.tracing, metrics)
        self.server_timing = logging.server_timing
        self._address = ClientAddress(logging.trusted_proxies)
        self._metrics = metrics

    @classmethod
    def build(cls, settings: Settings, metrics: GatewayMetrics) -> Observer | None:
        s = settings.logging
        if not (s.access.enabled and s.access.sample > 0) and not settings.tracing.enabled and not s.server_timing:
            return None
        return cls(settings, metrics)

    def _logged(self) -> bool:
        return self.access is not None and (self._sample >= 1.0 or random.random() < self._sample)

    def begin(self, scope: Scope, request_id: bytes) -> Observation | None:
        """The observation of a client's request, or None when nothing will read it."""
        logged = self._logged()
        path = scope["path"]
        traced = self.tracing is not None and path not in UNTRACED
        if not (logged or traced or self.server_timing):
            return None
        o = Observation(request_id.decode("latin-1"), scope["method"], path, self._address.of(scope), api_of(path))
        o.logged = logged
        if traced:
            assert self.tracing is not None
            self.tracing.begin_server(o, scope["headers"])
        return o

    def end(self, o: Observation) -> None:
        o.duration = time.perf_counter() - o.started
        if o.trace is not None:
            o.trace.end(o)
        if o.logged and self.access is not None:
            self.access.add(o)

    @contextmanager
    def batch_line(self, batch_id: str, request_id: str, api: str) -> Iterator[Observation | None]:
        """A batch line's observation (no client, no front middleware): its span starts a trace
        of its own, linked to the batch's span in this process."""
        logged = self._logged()
        if not (logged or self.tracing is not None):
            yield None
            return
        o = Observation(request_id, "POST", "", None, api)
        o.batch_id, o.logged = batch_id, logged
        if self.tracing is not None:
            self.tracing.begin_line(o, batch_id)
        token = CURRENT.set(o)
        try:
            yield o
        finally:
            CURRENT.reset(token)
            self.end(o)

    def batch(self, batch_id: str, attributes: dict[str, Any]) -> Any:
        """A context manager spanning a batch's run in this process (a no-op without tracing)."""
        if self.tracing is None:
            return _nothing()
        return self.tracing.batch(batch_id, attributes)

    def server_timing_header(self, o: Observation) -> bytes:
        parts = []
        for name, start, end in (
            ("admission", o.admit_start, o.admit_end),
            ("queue", o.queue_start, o.queue_end),
            ("upstream", o.upstream_start, o.upstream_headers),
        ):
            if start and end:
                parts.append(f"{name};dur={(end - start) * 1000:.3f}")
        return ", ".join(parts).encode()

    async def stop(self) -> None:
        if self.access is not None:
            self.access.close()
        if self.tracing is not None:
            await self.tracing.stop()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
