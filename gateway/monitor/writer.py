"""The inference log's writer: one row per request into the store, in the background, in batches.

The request path only calls `add`: one length check and one list append, no await, no I/O. A
writer task wakes every `flush_interval` (or as soon as `flush_rows` rows wait), turns the
entries into store rows (and builds the sampled payloads) and writes them with one
`append_requests` per batch of at most `MAX_BATCH` rows.

Serving never waits for the store. When a write fails (the store is down) the batch is kept and
retried with backoff; when a write is slow, rows keep arriving. Either way, once the rows held
(waiting plus being written) reach `buffer_size`, new rows are dropped and
`gateway_inference_log_dropped_total` counts them. A write that takes longer than
`WRITE_TIMEOUT` is abandoned and retried. On shutdown the writer makes one last attempt and
counts what it could not write as dropped.

Retention: every `TRIM_INTERVAL` seconds (the first time a minute after start, out of the way
of a starting replica) rows older than `retention_days` are deleted; each replica does it, and
deleting twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest
from gateway.monitor.payloads import Capture, Redactor, payload_json
from gateway.settings import InferenceLogSettings, ModelSettings
from gateway.store import InferenceRecord, Store

log = logging.getLogger(__name__)

MAX_BATCH = 2000  # rows per transaction
CONVERT_SLICE = 200  # rows converted between two yields to the event loop (about 1 ms of CPU)
WRITE_TIMEOUT = 30.0
MAX_BACKOFF = 5.0
STOP_TIMEOUT = 5.0
TRIM_INTERVAL = 3600.0
TRIM_FIRST_DELAY = 60.0
DAY = 86400.0


class LogEntry(NamedTuple):
    """What the exchange hands over: plain values, built in O(1). `time` is the request's start
    (Unix seconds); `duration` and `ttft` are seconds from that start."""

    time: float
    request_id: bytes
    key_id: str | None
    model: str
    route: str | None
    engine: str | None
    status: int
    error_code: str | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None
    duration: float
    finish_reason: str | None
    client_disconnect: bool
    batch_id: str | None
    capture: Capture | None = None
    api: str = "chat"  # the endpoint's kind: chat, completions, embeddings, responses, messages, ...


class _Sampler(NamedTuple):
    share: float
    max_bytes: int
    redact: Redactor


class InferenceLog:
    def __init__(
        self,
        settings: InferenceLogSettings,
        models: tuple[ModelSettings, ...],
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store: Store | None = None  # given at start: the store opens in the app's lifespan
        self._settings = settings
        self._capacity = settings.buffer_size
        self._flush_rows = settings.flush_rows
        self._clock = clock
        self._rng = rng or random.Random()
        self._samplers = {
            m.name: _Sampler(m.log_payloads.sample, m.log_payloads.max_bytes, Redactor.of(m.log_payloads))
            for m in models
            if m.log_payloads is not None and m.log_payloads.sample > 0
        }
        self._buffer: list[LogEntry] = []
        self._pending: list[LogEntry] = []  # taken from the buffer, not yet written
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = metrics.inference_log_dropped
        self.written = metrics.inference_log_written
        self.write_errors = metrics.inference_log_write_errors

    # The request path -------------------------------------------------------------------------

    def add(self, entry: LogEntry) -> None:
        buffer = self._buffer
        if len(buffer) + len(self._pending) >= self._capacity:
            self.dropped.inc()
            return
        buffer.append(entry)
        if len(buffer) == self._flush_rows:
            self._wake.set()

    def capture(self, request: ApiRequest) -> Capture | None:
        """A Capture when this request is sampled for payload logging (its model's `log_payloads`)."""
        sampler = self._samplers.get(request.model)
        if sampler is None or self._rng.random() >= sampler.share:
            return None
        return Capture(request.body, sampler.max_bytes)

    # The writer -------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self._buffer) + len(self._pending)

    def start(self, store: Store) -> None:
        self._store = store
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="inference-log-writer")]
        if self._settings.retention_days > 0:
            self._tasks.append(loop.create_task(self._trim_loop(), name="inference-log-retention"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                while self.held:
                    await self.flush()
        except Exception as exc:  # the store is down at shutdown: what is left is lost
            log.warning("inference log: %d rows not written at shutdown: %s", self.held, exc)
            self.dropped.inc(self.held)
            self._buffer, self._pending = [], []

    async def flush(self) -> int:
        """Writes the rows waiting now (not those that arrive meanwhile: they wait for the next
        tick, so rows go in batches under load); returns how many. Raises when the store fails,
        and the rows stay pending for the next try."""
        if not self._pending:
            self._pending, self._buffer = self._buffer, []
        written = 0
        while self._pending:
            chunk = self._pending[:MAX_BATCH]
            rows: list[InferenceRecord] = []
            for start in range(0, len(chunk), CONVERT_SLICE):
                if start:
                    await asyncio.sleep(0)  # requests in flight get the loop between slices
                rows += [self._row(e) for e in chunk[start : start + CONVERT_SLICE]]
            assert self._store is not None, "start() gives the store"
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self._store.append_requests(rows)
            del self._pending[: len(chunk)]
            self.written.inc(len(chunk))
            written += len(chunk)
        return written

    async def _run(self) -> None:
        failures = 0
        interval = self._settings.flush_interval
        while True:
            if failures:
                await asyncio.sleep(min(interval * 2**failures, MAX_BACKOFF))
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                if failures:
                    log.warning("inference log: the store is back; writing again")
                failures = 0
            except Exception as exc:
                self.write_errors.inc()
                if not failures:
                    log.warning("inference log: cannot write to the store (%s); retrying with backoff", exc)
                failures += 1

    async def trim(self) -> int:
        """Retention: deletes the rows older than `retention_days`; returns how many."""
        assert self._store is not None, "start() gives the store"
        return await self._store.delete_requests_before(self._clock() - self._settings.retention_days * DAY)

    async def _trim_loop(self) -> None:
        await asyncio.sleep(TRIM_FIRST_DELAY)
        while True:
            try:
                deleted = await self.trim()
                if deleted:
                    log.info("inference log: retention deleted %d rows", deleted)
            except Exception as exc:
                log.warning("inference log: retention failed (%s); next try in %.0f s", exc, TRIM_INTERVAL)
            await asyncio.sleep(TRIM_INTERVAL)

    def _row(self, e: LogEntry) -> InferenceRecord:
        payload = None
        if e.capture is not None:
            sampler = self._samplers[e.model]
            try:
                payload = payload_json(e.capture, e.stream, sampler.redact)
            except Exception as exc:  # a capture must never cost the row itself
                log.warning("inference log: payload of %s not captured: %s", e.request_id.decode(), exc)
        return InferenceRecord(
            time=e.time,
            request_id=e.request_id.decode("latin-1"),
            key_id=e.key_id,
            model=e.model,
            route=e.route,
            engine=e.engine,
            status=e.status,
            error_code=None if e.error_code is None else str(e.error_code),
            stream=e.stream,
            prompt_tokens=e.prompt_tokens,
            completion_tokens=e.completion_tokens,
            ttft=e.ttft,
            duration=e.duration,
            finish_reason=e.finish_reason,
            client_disconnect=e.client_disconnect,
            batch_id=e.batch_id,
            payload=payload,
            api=e.api,
        )
