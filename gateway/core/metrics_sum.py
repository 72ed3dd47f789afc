"""The metrics of several worker processes as one: snapshots of each worker's values, and their sum.

Each worker keeps its metrics in its own memory (prometheus_client's plain values: an update is a
float added under a lock). A scrape with `--workers N` sums the workers' snapshots
(gateway/core/metrics_link.py asks for them, gateway/process/metrics_hub.py gathers them):

- counters and histograms (every `_total`, `_bucket`, `_count`, `_sum`) are summed; their
  `_created` samples are left out (as prometheus_client's multiprocess mode did: a sum has no
  single start, and they would double the work of a scrape with many series);
- a gauge is summed or its maximum taken, as declared with it in gateway/core/metrics.py (what
  prometheus_client's multiprocess modes `livesum` and `livemax` did);
- each histogram bucket keeps the newest exemplar of any worker.

A snapshot is plain data (JSON over the wire): family name -> `{"type", "merge", "samples"}`, a
sample being `[name, labels, value, exemplar]` with the exemplar `[labels, value, timestamp]` or
null. `retired` keeps what a worker that ended had counted (its gauges go with it), so a total
never goes back when a worker dies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Exemplar, Sample

Families = dict[str, dict[str, Any]]  # family name -> {"type": str, "merge": "sum" | "max", "samples": [...]}
Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, its labels


def snapshot(registry: CollectorRegistry, gauge_merge: dict[str, str]) -> Families:
    """This process's values, as plain data."""
    families: Families = {}
    for metric in registry.collect():
        samples = [
            [s.name, s.labels, s.value, None if (e := s.exemplar) is None else [e.labels, e.value, e.timestamp]]
            for s in metric.samples
            if not s.name.endswith("_created")
        ]
        families[metric.name] = {"type": metric.type, "merge": gauge_merge.get(metric.name, "sum"), "samples": samples}
    return families


def merge(snapshots: Iterable[Families]) -> Families:
    """The sum of several processes' snapshots (the module docstring says how each kind adds up)."""
    out: Families = {}
    index: dict[str, dict[Key, list[Any]]] = {}
    for families in snapshots:
        for name, family in families.items():
            merged = out.get(name)
            if merged is None:
                merged = out[name] = {"type": family["type"], "merge": family["merge"], "samples": []}
                index[name] = {}
            seen, rows = index[name], merged["samples"]
            take_max = family["type"] == "gauge" and family["merge"] == "max"
            for sample_name, labels, value, exemplar in family["samples"]:
                value = math.nan if value is None else value  # JSON has no NaN: orjson writes null
                key = (sample_name, tuple(labels.items()))
                row = seen.get(key)
                if row is None:
                    seen[key] = row = [sample_name, labels, value, exemplar]
                    rows.append(row)
                    continue
                if take_max:
                    row[2] = max(row[2], value)
                else:
                    row[2] += value
                if exemplar is not None and (row[3] is None or row[3][2] < exemplar[2]):
                    row[3] = exemplar
    return out


def counted(families: Families) -> Families:
    """What outlives a worker: its counters and histograms, not its gauges (they say what is live)."""
    return {name: family for name, family in families.items() if family["type"] != "gauge"}


Described = list[tuple[str, str, str, str]]  # each family's name, help, type and unit, in the registry's order


def described(registry: CollectorRegistry) -> Described:
    return [(m.name, m.documentation, m.type, m.unit) for m in registry.collect()]


class Summed:
    """A collector of merged families, in the order and with the help of the registry they came from."""

    def __init__(self, families: Families, described: Described) -> None:
        self._families = families
        self._described = described

    def collect(self) -> Iterator[Metric]:
        for name, documentation, typ, unit in self._described:
            metric = Metric(name, documentation, typ, unit)
            family = self._families.get(name)
            for sample_name, labels, value, ex in family["samples"] if family is not None else ():
                exemplar = None if ex is None else Exemplar(ex[0], ex[1], ex[2])
                metric.samples.append(Sample(sample_name, labels, value, None, exemplar))
            yield metric
