"""What is observed of one request: filled as it goes, read once at its end (access log, spans).

The front middleware (or the batch runner, for a batch line) makes one `Observation` and puts it
in `CURRENT`; the exchange finds it there and notes what only it knows (key, route, engine,
tokens, when admission, the queue and the upstream call began and ended). Times are
`time.perf_counter()` readings; `wall` maps them to the epoch for the spans.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


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
