"""A model's report: its routes (versions) side by side over a window, and drift against a baseline.

Per route, over the window's requests (`ReportRow`s from the inference log):

- `requests`; `errors` (status 400 and above, except 499: the client went away, counted as
  `disconnects`) and `error_rate` = errors / requests;
- `prompt_tokens`, `completion_tokens`: sums over every request (what was charged);
- over the successful requests (status 200) only: `latency_p50`/`p95` (seconds, whole request),
  `ttft_p50`/`p95` (streamed requests: time to the first chunk), `output_tokens_per_second`
  (their completion tokens over their summed durations), `mean_prompt_tokens`,
  `mean_completion_tokens`, and `finish_reasons` (counts; `finish_reason_mix`: shares).

Drift (the whole model, successful requests): the PSI of prompt length, completion length and
finish reason between the baseline window and the report's window (gateway/monitor/drift.py).

Percentiles and drift use every value up to RESERVOIR per series and a uniform sample of that
size beyond it (counts and sums are always exact), so a report over millions of rows stays in
bounded memory. The sample is seeded: the same rows give the same report.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.monitor.drift import Drift, categorical_drift, numeric_drift, percentile
from gateway.store import ReportRow

RESERVOIR = 100_000
DISCONNECTED = 499
NO_ROUTE = "-"  # requests refused before a route was chosen (quota, no engine)
NO_REASON = "none"


class Reservoir:
    """Every value up to `size`, then a uniform sample of that size (Algorithm R)."""

    __slots__ = ("_rng", "seen", "size", "values")

    def __init__(self, size: int = RESERVOIR, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value

    def quantiles(self, *qs: float) -> list[float | None]:
        if not self.values:
            return [None] * len(qs)
        ordered = sorted(self.values)
        return [percentile(ordered, q) for q in qs]


@dataclass
class RouteStats:
    route: str
    requests: int = 0
    errors: int = 0
    disconnects: int = 0
    succeeded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ok_prompt_tokens: int = 0
    ok_completion_tokens: int = 0
    ok_duration: float = 0.0
    latency: Reservoir = field(default_factory=Reservoir)
    ttft: Reservoir = field(default_factory=Reservoir)
    finish_reasons: Counter[str] = field(default_factory=Counter)

    def add(self, row: ReportRow) -> None:
        self.requests += 1
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        if row.status == DISCONNECTED:
            self.disconnects += 1
        elif row.status >= 400:
            self.errors += 1
        if row.status != 200:
            return
        self.succeeded += 1
        self.ok_prompt_tokens += row.prompt_tokens
        self.ok_completion_tokens += row.completion_tokens
        self.ok_duration += row.duration
        self.latency.add(row.duration)
        if row.ttft is not None:
            self.ttft.add(row.ttft)
        self.finish_reasons[row.finish_reason or NO_REASON] += 1

    def as_json(self) -> dict[str, Any]:
        latency_p50, latency_p95 = self.latency.quantiles(0.5, 0.95)
        ttft_p50, ttft_p95 = self.ttft.quantiles(0.5, 0.95)
        finished = sum(self.finish_reasons.values())
        ok = self.succeeded
        return {
            "route": self.route,
            "requests": self.requests,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "error_rate": _ratio(self.errors, self.requests),
            "latency_p50": latency_p50,
            "latency_p95": latency_p95,
            "ttft_p50": ttft_p50,
            "ttft_p95": ttft_p95,
            "output_tokens_per_second": _ratio(self.ok_completion_tokens, self.ok_duration),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "mean_prompt_tokens": _ratio(self.ok_prompt_tokens, ok),
            "mean_completion_tokens": _ratio(self.ok_completion_tokens, ok),
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "finish_reason_mix": {k: v / finished for k, v in sorted(self.finish_reasons.items())},
        }


@dataclass
class WindowSample:
    """The distributions drift compares, over one window's successful requests."""

    prompt_lengths: Reservoir = field(default_factory=lambda: Reservoir(seed=1))
    completion_lengths: Reservoir = field(default_factory=lambda: Reservoir(seed=2))
    finish_reasons: Counter[str] = field(default_factory=Counter)

    def add(self, row: ReportRow) -> None:
        if row.status != 200:
            return
        self.prompt_lengths.add(row.prompt_tokens)
        self.completion_lengths.add(row.completion_tokens)
        self.finish_reasons[row.finish_reason or NO_REASON] += 1


@dataclass
class ModelReport:
    routes: dict[str, RouteStats] = field(default_factory=dict)
    current: WindowSample = field(default_factory=WindowSample)
    baseline: WindowSample = field(default_factory=WindowSample)

    def add(self, row: ReportRow) -> None:
        name = row.route or NO_ROUTE
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats(name)
        stats.add(row)
        self.current.add(row)

    def add_baseline(self, row: ReportRow) -> None:
        self.baseline.add(row)

    def drift(self) -> dict[str, Drift]:
        b, c = self.baseline, self.current
        return {
            "prompt_tokens": numeric_drift(b.prompt_lengths.values, c.prompt_lengths.values),
            "completion_tokens": numeric_drift(b.completion_lengths.values, c.completion_lengths.values),
            "finish_reason": categorical_drift(b.finish_reasons, c.finish_reasons),
        }

    def as_json(self, route_order: Iterable[str] = ()) -> dict[str, Any]:
        """Routes in `route_order` first (the model's configured order), then any others by name."""
        order = [r for r in route_order if r in self.routes]
        order += sorted(r for r in self.routes if r not in order)
        drift = self.drift()
        return {
            "routes": [self.routes[r].as_json() for r in order],
            "drift": {name: d.as_json() for name, d in drift.items()},
            "drifted": any(d.drifted for d in drift.values()),
        }


async def read_report(
    rows: AsyncIterable[ReportRow], baseline_rows: AsyncIterable[ReportRow] | None = None
) -> ModelReport:
    report = ModelReport()
    async for row in rows:
        report.add(row)
    if baseline_rows is not None:
        async for row in baseline_rows:
            report.add_baseline(row)
    return report


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
