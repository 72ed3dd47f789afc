"""The report and drift maths (gateway/monitor/report.py, drift.py): pure functions, known answers."""

from __future__ import annotations

import math
import random

import pytest

from gateway.monitor.drift import (
    EPSILON,
    bin_counts,
    categorical_drift,
    numeric_drift,
    percentile,
    psi,
    quantile_edges,
)
from gateway.monitor.report import ModelReport, Reservoir
from gateway.store import ReportRow


def row(
    route: str | None = "v1",
    status: int = 200,
    ttft: float | None = None,
    duration: float = 1.0,
    prompt: int = 10,
    completion: int = 5,
    finish: str | None = "stop",
) -> ReportRow:
    return ReportRow(0.0, route, status, ttft, duration, prompt, completion, finish)


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.95) == pytest.approx(4.8)
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_psi_matches_the_formula_and_replaces_empty_shares() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi([0.5, 0.5], [0.8, 0.2]) == pytest.approx(expected)
    assert psi([1.0, 0.0], [0.0, 1.0]) == pytest.approx(2 * (1 - EPSILON) * math.log(1 / EPSILON))


def test_bins_are_the_baseline_deciles_with_ties_merged() -> None:
    baseline = list(range(1, 101))
    edges = quantile_edges(baseline)
    assert len(edges) == 9
    assert bin_counts(baseline, edges) == [10] * 9 + [10]
    assert quantile_edges([8.0] * 50) == [8.0]  # all alike: two bins, <= 8 and > 8
    assert bin_counts([8, 8, 9], [8.0]) == [2, 1]


def test_numeric_drift_flags_a_shift_and_not_a_resample() -> None:
    rng = random.Random(7)
    baseline = [rng.gauss(100, 20) for _ in range(5000)]
    same = [rng.gauss(100, 20) for _ in range(5000)]
    shifted = [rng.gauss(130, 20) for _ in range(5000)]
    stable = numeric_drift(baseline, same)
    assert stable.psi is not None and stable.psi < 0.02 and not stable.drifted
    moved = numeric_drift(baseline, shifted)
    assert moved.psi is not None and moved.psi > 0.2 and moved.drifted
    assert [b.label for b in moved.bins][-1].startswith("> ")
    assert numeric_drift([], same).psi is None and not numeric_drift(baseline, []).drifted


def test_categorical_drift_over_the_union_of_labels() -> None:
    d = categorical_drift({"stop": 90, "length": 10}, {"stop": 90, "length": 10})
    assert d.psi == 0.0 and not d.drifted
    d = categorical_drift({"stop": 90, "length": 10}, {"stop": 40, "length": 40, "content_filter": 20})
    assert [b.label for b in d.bins] == ["content_filter", "length", "stop"]
    assert d.drifted and d.psi is not None and d.psi > 1


def test_reservoir_keeps_everything_up_to_its_size_then_a_uniform_sample() -> None:
    r = Reservoir(size=100, seed=3)
    for i in range(100):
        r.add(float(i))
    assert sorted(r.values) == [float(i) for i in range(100)]
    for i in range(100, 10_000):
        r.add(float(i))
    assert len(r.values) == 100 and r.seen == 10_000
    assert 3000 < sum(r.values) / 100 < 7000  # a uniform sample of 0..9999 has mean ~5000


def test_route_stats_count_errors_tokens_latency_and_finish_reasons() -> None:
    report = ModelReport()
    for duration in (1.0, 2.0, 3.0, 4.0):
        report.add(row(duration=duration, ttft=duration / 10, completion=duration * 10))  # type: ignore[arg-type]
    report.add(row(status=502, duration=0.5, prompt=10, completion=3, finish=None))
    report.add(row(status=499, duration=0.2, prompt=10, completion=1, finish=None))
    report.add(row(route="v2", finish="length"))
    report.add(row(route=None, status=429, prompt=0, completion=0, finish=None))
    out = report.as_json(["v2", "v1"])
    v2, v1, none = out["routes"]
    assert [v2["route"], v1["route"], none["route"]] == ["v2", "v1", "-"]
    assert v1["requests"] == 6 and v1["errors"] == 1 and v1["disconnects"] == 1
    assert v1["error_rate"] == pytest.approx(1 / 6)
    assert v1["prompt_tokens"] == 60 and v1["completion_tokens"] == 10 + 20 + 30 + 40 + 3 + 1
    assert v1["mean_prompt_tokens"] == 10 and v1["mean_completion_tokens"] == 25  # successful only
    assert v1["latency_p50"] == pytest.approx(2.5) and v1["latency_p95"] == pytest.approx(3.85)
    assert v1["ttft_p50"] == pytest.approx(0.25)
    assert v1["output_tokens_per_second"] == pytest.approx(100 / 10)
    assert v1["finish_reasons"] == {"stop": 4} and v1["finish_reason_mix"] == {"stop": 1.0}
    assert v2["finish_reason_mix"] == {"length": 1.0} and v2["ttft_p50"] is None
    assert none["error_rate"] == 1.0 and none["latency_p50"] is None
    assert out["drift"]["prompt_tokens"]["psi"] is None  # no baseline given
    assert out["drifted"] is False


def test_model_drift_compares_the_successful_requests_of_both_windows() -> None:
    report = ModelReport()
    for i in range(200):
        report.add_baseline(row(prompt=10 + i % 20))
        report.add(row(prompt=10 + i % 20))
        report.add(row(status=500, prompt=10_000))  # failures do not count towards drift
    out = report.as_json()
    assert out["drift"]["prompt_tokens"]["psi"] == 0.0 and not out["drifted"]
    shifted = ModelReport()
    for i in range(200):
        shifted.add_baseline(row(prompt=10 + i % 20))
        shifted.add(row(prompt=25 + i % 20, finish="length"))
    out = shifted.as_json()
    assert out["drift"]["prompt_tokens"]["drifted"] and out["drift"]["finish_reason"]["drifted"]
    assert not out["drift"]["completion_tokens"]["drifted"] and out["drifted"]
