"""The one object the request path talks to: begins and ends a request's observation.

`Observer.build` answers None when the access log, tracing and Server-Timing are all off, and
the request path then checks `gw.observe is None` once and does nothing else: no observation,
no span, no context variable. A request the access log samples out and tracing does not cover
gets no observation either.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.types import Scope

from gateway.core.metrics import GatewayMetrics
from gateway.observe.access_log import AccessLog
from gateway.observe.client_address import ClientAddress
from gateway.observe.record import CURRENT, Observation
from gateway.settings import Settings

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
