"""Exemplars: the latency and time-to-first-token histograms carry a sampled request's trace id, in
the OpenMetrics exposition (when the scraper asks for it), with one worker and with several (each
bucket shows the newest of any worker: gateway/core/metrics_sum.py), parsed by prometheus_client's
own OpenMetrics parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream, gateway
from tests.otlp_receiver import HttpReceiver

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
HISTOGRAMS = ("gateway_request_duration_seconds", "gateway_time_to_first_token_seconds")


@pytest.fixture(scope="module")
def engine(logs_dir: Path) -> Iterator[Proc]:
    proc = fake_upstream(logs_dir, "--chunks", "4", "--record-trace", name="exemplar-fake").start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def exemplars(gw: Proc) -> dict[str, set[str]]:
    """Histogram name -> the trace ids of its buckets' exemplars, from an OpenMetrics scrape."""
    r = httpx.get(gw.url + "/metrics", headers={"accept": OPENMETRICS}, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.exemplar is not None:
                found.setdefault(family.name, set()).add(sample.exemplar.labels["trace_id"])
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_latency_and_ttft_buckets_carry_sampled_trace_ids(logs_dir: Path, engine: Proc, workers: int) -> None:
    with HttpReceiver() as receiver:
        config = {
            "auth": {"enabled": False},
            "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
            "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
            "tracing": {"endpoint": receiver.endpoint},
        }
        gw = gateway(logs_dir, config, name=f"gw-exemplars-{workers}", workers=workers).start()
        gw.wait_healthy("/ready", timeout=60)
        try:
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            for _ in range(4):
                with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as r:
                    assert r.status_code == 200
                    r.read()
            sent = {
                t["traceparent"].split("-")[1] for t in httpx.get(engine.url + "/traces").json() if t["traceparent"]
            }
            # a stream is counted once it has ended, which may be just after its client read the end
            found = eventually(lambda: exemplars(gw), lambda f: all(f.get(h) for h in HISTOGRAMS), timeout=15)
            for h in HISTOGRAMS:
                assert found.get(h), f"no exemplar on {h}: {found}"
                assert found[h] <= sent  # the trace ids of requests this gateway served
            receiver.wait_for(lambda spans: found[HISTOGRAMS[0]] <= {s.trace_id for s in spans})  # exported traces
            # the plain scrape is unchanged: Prometheus text, no exemplars
            plain = httpx.get(gw.url + "/metrics", timeout=5)
            assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
            names = {f.name for f in text_families(plain.text)}
            assert "gateway_request_duration_seconds" in names
        finally:
            gw.stop()
