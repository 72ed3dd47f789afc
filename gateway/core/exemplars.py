"""Exemplars (a sampled request's trace id on a histogram bucket) with several worker processes.

prometheus_client keeps exemplars only in a single process: its multiprocess values drop them.
So each worker also notes the newest exemplar per histogram bucket here and writes them, at
most once a second, to a small JSON file of its own in the multiprocess directory (written
aside and renamed, so a reader never sees half a file). The worker that answers a scrape reads
every worker's file and puts the newest exemplar of each bucket on the merged samples
(`MergedCollector`). Exemplars only appear in the OpenMetrics exposition, which the scraper asks
for in its Accept header; Prometheus needs `--enable-feature=exemplar-storage` to keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

WRITE_EVERY = 1.0  # seconds
PREFIX = "exemplars_"

Key = tuple[str, tuple[str, ...], str]  # metric name, label values, bucket bound (`le`)


class ExemplarFiles:
    """This process's newest exemplar per bucket, written to its file in the multiprocess directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._path = os.path.join(directory, f"{PREFIX}{os.getpid()}.json")
        self._newest: dict[Key, tuple[dict[str, str], float, float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, name: str, labels: tuple[str, ...], buckets: tuple[float, ...], value: float, ex: Any) -> None:
        bound = next((b for b in buckets if value <= b), float("inf"))
        self._newest[(name, labels, floatToGoString(bound))] = (ex.labels, ex.value, ex.timestamp)
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no loop (a test calling in): written at the next note
                self._timer = asyncio.get_running_loop().call_later(WRITE_EVERY, self.write)

    def write(self) -> None:
        self._timer = None
        rows = [[name, list(labels), le, ex, value, ts] for (name, labels, le), (ex, value, ts) in self._newest.items()]
        aside = f"{self._path}.tmp"
        try:
            with open(aside, "wb") as f:
                f.write(orjson.dumps(rows))
            os.replace(aside, self._path)
        except OSError:
            pass  # the directory is gone (shutting down): exemplars are a nicety


def read_all(directory: str) -> dict[Key, Exemplar]:
    """Every worker's newest exemplar per bucket; the newest of them wins."""
    merged: dict[Key, Exemplar] = {}
    for path in glob.glob(os.path.join(directory, f"{PREFIX}*.json")):
        try:
            with open(path, "rb") as f:
                rows = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            continue
        for name, labels, le, ex, value, ts in rows:
            key = (name, tuple(labels), le)
            found = merged.get(key)
            if found is None or (found.timestamp or 0) < ts:
                merged[key] = Exemplar(ex, value, ts)
    return merged


class MergedCollector:
    """The multiprocess collector's metrics, with the workers' exemplars on their buckets."""

    def __init__(self, directory: str, label_names: dict[str, tuple[str, ...]]) -> None:
        self._directory = directory
        self._label_names = label_names  # histogram name -> its label names, in order

    def collect(self) -> Iterator[Metric]:
        exemplars = read_all(self._directory)
        for metric in MultiProcessCollector(None, self._directory).collect():
            names = self._label_names.get(metric.name)
            if names is not None and exemplars:
                samples = []
                for s in metric.samples:
                    if s.name.endswith("_bucket"):
                        key = (metric.name, tuple(s.labels.get(n, "") for n in names), s.labels.get("le", ""))
                        ex = exemplars.get(key)
                        if ex is not None:
                            s = s._replace(exemplar=ex)
                    samples.append(s)
                metric.samples = samples
            yield metric
