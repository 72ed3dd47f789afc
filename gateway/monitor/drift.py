"""Drift between two windows of traffic: the population stability index (PSI).

    PSI = sum over bins of (current share - baseline share) * ln(current share / baseline share)

Numbers (prompt and completion lengths in tokens) are binned by the baseline's deciles: the
distinct values among its 10th, 20th, ..., 90th percentiles are the upper bounds (inclusive) of
up to nine bins, and a last bin takes everything above; so each bin holds about a tenth of the
baseline, and ties (many prompts of one length) merge bins rather than leave empty ones. Labels
(finish reasons; a missing one counts as "none") are binned one bin per label seen in either
window. A share of 0 is replaced by EPSILON, so a bin empty on one side counts heavily but
finitely. The usual reading: below 0.1 stable, 0.1 to 0.2 a moderate shift, above 0.2
(THRESHOLD) a significant one, which is flagged.

Pure functions, no I/O: gateway/monitor/report.py feeds them.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

THRESHOLD = 0.2
EPSILON = 1e-4
DECILES = tuple(i / 10 for i in range(1, 10))


@dataclass(frozen=True)
class Bin:
    label: str  # "<= 12", "> 40", or a finish reason
    baseline: float  # share of the baseline window
    current: float  # share of the current window


@dataclass(frozen=True)
class Drift:
    psi: float | None  # None when either window is empty
    drifted: bool  # psi > THRESHOLD
    baseline_count: int
    current_count: int
    bins: tuple[Bin, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "psi": None if self.psi is None else round(self.psi, 6),
            "drifted": self.drifted,
            "threshold": THRESHOLD,
            "baseline_count": self.baseline_count,
            "current_count": self.current_count,
            "bins": [
                {"bin": b.label, "baseline": round(b.baseline, 6), "current": round(b.current, 6)} for b in self.bins
            ],
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of sorted values, linearly interpolated between ranks (as
    numpy's default); `ordered` must not be empty."""
    if not ordered:
        raise ValueError("percentile of no values")
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def quantile_edges(baseline: Sequence[float], qs: Sequence[float] = DECILES) -> list[float]:
    ordered = sorted(baseline)
    return sorted({percentile(ordered, q) for q in qs})


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts in the bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect_left(edges, v)] += 1
    return counts


def shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * len(counts)


def psi(baseline: Sequence[float], current: Sequence[float], epsilon: float = EPSILON) -> float:
    """PSI of two share vectors over the same bins; shares of 0 become `epsilon`."""
    total = 0.0
    for b, c in zip(baseline, current, strict=True):
        b, c = max(b, epsilon), max(c, epsilon)
        total += (c - b) * math.log(c / b)
    return total


def numeric_drift(baseline: Sequence[float], current: Sequence[float]) -> Drift:
    if not baseline or not current:
        return Drift(None, False, len(baseline), len(current), ())
    edges = quantile_edges(baseline)
    b, c = shares(bin_counts(baseline, edges)), shares(bin_counts(current, edges))
    labels = [f"<= {_num(e)}" for e in edges] + [f"> {_num(edges[-1])}"]
    value = psi(b, c)
    bins = tuple(Bin(label, bs, cs) for label, bs, cs in zip(labels, b, c, strict=True))
    return Drift(value, value > THRESHOLD, len(baseline), len(current), bins)


def categorical_drift(baseline: Mapping[str, int], current: Mapping[str, int]) -> Drift:
    nb, nc = sum(baseline.values()), sum(current.values())
    if not nb or not nc:
        return Drift(None, False, nb, nc, ())
    labels = sorted(set(baseline) | set(current))
    b = shares([baseline.get(label, 0) for label in labels])
    c = shares([current.get(label, 0) for label in labels])
    value = psi(b, c)
    bins = tuple(Bin(label, bs, cs) for label, bs, cs in zip(labels, b, c, strict=True))
    return Drift(value, value > THRESHOLD, nb, nc, bins)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.1f}"
