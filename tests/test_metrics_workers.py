"""`--workers N`: each worker keeps its metrics in memory and a scrape of any worker shows the sum
over all of them (gateway/core/metrics_sum.py, gateway/core/metrics_link.py,
gateway/process/metrics_hub.py). The sum's rules on real GatewayMetrics in this process, then a
real gateway with two workers: either worker's scrape shows the same totals, and a killed
worker's counts stay in them."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from gateway.core.metrics import GatewayMetrics
from gateway.core.metrics_sum import counted, merge
from testkit.metrics import metric
from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream, gateway

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def openmetrics(m: GatewayMetrics, families: dict[str, object]) -> dict[str, dict[tuple[tuple[str, str], ...], object]]:
    """Sample name -> labels -> (value, exemplar trace id), from `m`'s OpenMetrics exposition of `families`."""
    body, content_type = m.render(OPENMETRICS, families)  # type: ignore[arg-type]
    assert content_type.startswith("application/openmetrics-text")
    out: dict[str, dict[tuple[tuple[str, str], ...], object]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            trace = s.exemplar.labels["trace_id"] if s.exemplar is not None else None
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = (s.value, trace)
    return out


def test_counters_and_histograms_add_up_gauges_by_their_rule_and_the_newest_exemplar_wins() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.requests_by["m", "e", "200", "v1", "chat"].inc(3)
    b.requests_by["m", "e", "200", "v1", "chat"].inc(4)
    b.requests_by["m", "e", "500", "v1", "chat"].inc()  # a series only one worker has
    a.observe(a.latency_by, ("m", "v1", "chat"), 0.003, "aaaa")
    b.observe(b.latency_by, ("m", "v1", "chat"), 0.004, "bbbb")  # the same bucket, later
    b.observe(b.latency_by, ("m", "v1", "chat"), 0.7, None)
    a.in_flight.inc(2)
    b.in_flight.inc(3)  # summed
    a.engine_healthy.labels("e").set(1)
    b.engine_healthy.labels("e").set(1)  # the maximum: one healthy engine, not two

    total = openmetrics(a, merge([a.snapshot(), b.snapshot()]))
    requests = total["gateway_requests_total"]
    assert requests[(("api", "chat"), ("engine", "e"), ("model", "m"), ("route", "v1"), ("status", "200"))] == (7, None)
    assert requests[(("api", "chat"), ("engine", "e"), ("model", "m"), ("route", "v1"), ("status", "500"))] == (1, None)
    buckets = total["gateway_request_duration_seconds_bucket"]
    labels = (("api", "chat"), ("model", "m"), ("route", "v1"))
    assert buckets[(*labels[:1], ("le", "0.005"), *labels[1:])] == (2, "bbbb")
    assert buckets[(*labels[:1], ("le", "1.0"), *labels[1:])] == (3, None)
    assert total["gateway_request_duration_seconds_count"][labels] == (3, None)
    assert total["gateway_requests_in_flight"][()] == (5, None)
    assert total["gateway_engine_healthy"][(("engine", "e"),)] == (1, None)
    assert "gateway_requests_created" not in total  # a sum has no single start

    # A worker that ended: its counts stay, its gauges go.
    total = openmetrics(a, merge([counted(b.snapshot()), a.snapshot()]))
    assert total["gateway_requests_total"][
        (("api", "chat"), ("engine", "e"), ("model", "m"), ("route", "v1"), ("status", "200"))
    ] == (7, None)
    assert total["gateway_requests_in_flight"][()] == (2, None)


# -- two worker processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(logs_dir: Path) -> Iterator[Proc]:
    up = fake_upstream(logs_dir, "--model", "m", name="metrics-workers-fake").start().wait_healthy()
    config = {
        "engines": [{"name": "e", "kind": "openai", "url": up.url}],
        "models": [{"name": "m", "routes": [{"engine": "e"}]}],
        "auth": {"enabled": False},
    }
    proc = gateway(logs_dir, config, name="gw-metrics-workers", workers=2).start()
    try:
        yield proc.wait_healthy("/ready", timeout=60)
    finally:
        proc.stop()
        up.stop()


def workers(gw: Proc) -> list[psutil.Process]:
    assert gw.proc is not None
    return [c for c in psutil.Process(gw.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]


def ask(gw: Proc, n: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(n):  # a connection each: whichever worker accepts it serves it
        assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def totals(gw: Proc) -> tuple[float, float, float]:
    """Requests served, latency observations, healthy engines: from one scrape."""
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    return (
        metric(text, "gateway_requests_total", model="m", status="200"),
        metric(text, "gateway_request_duration_seconds_count", model="m"),
        metric(text, "gateway_engine_healthy", engine="e"),
    )


def settled(gw: Proc) -> tuple[float, float, float]:
    """The totals once every request answered is counted (nothing is in flight)."""
    return eventually(lambda: totals(gw), lambda t: t[0] == t[1] and t[2] == 1, what="a settled scrape")


@contextmanager
def only(serving: psutil.Process, stopped: psutil.Process) -> Iterator[None]:
    """While `stopped` is stopped (SIGSTOP), `serving` accepts every connection."""
    assert serving.is_running()
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(stopped.pid, signal.SIGCONT)


def test_either_worker_shows_every_workers_counts(gw: Proc) -> None:
    first, second = workers(gw)
    start = settled(gw)
    with only(first, second):
        ask(gw, 3)
    with only(second, first):
        ask(gw, 5)
    # healthy engines: the maximum over the workers, not their sum
    want = (start[0] + 8, start[1] + 8, 1.0)
    assert eventually(lambda: totals(gw), lambda t: t == want, what="the sum over both workers") == want
    for serving, stopped in ((first, second), (second, first)):
        with only(serving, stopped):  # answered by `serving`; `stopped` counts with its last snapshot
            assert totals(gw) == want


def test_a_killed_workers_counts_stay_in_the_totals(gw: Proc) -> None:
    first, second = workers(gw)
    start = settled(gw)
    with only(first, second):
        ask(gw, 4)  # served by the worker about to be killed
    with only(second, first):
        ask(gw, 2)
    want = (start[0] + 6, start[1] + 6, 1.0)
    assert eventually(lambda: totals(gw), lambda t: t == want, what="the sum over both workers") == want
    first.kill()
    first.wait(10)

    seen: set[tuple[float, float, float]] = set()

    def replaced() -> list[psutil.Process]:
        seen.add(totals(gw))
        return [w for w in workers(gw) if w.pid not in (first.pid, second.pid)]

    replacement = eventually(replaced, timeout=60, what="a new worker")[0]
    assert seen == {want}  # every scrape meanwhile: the dead worker's counts stayed
    with only(replacement, second):
        assert totals(gw) == want  # the new worker's scrape (answered once it serves)
    ask(gw, 3)
    want = (want[0] + 3, want[1] + 3, 1.0)
    assert eventually(lambda: totals(gw), lambda t: t == want, what="counting on after the kill") == want
