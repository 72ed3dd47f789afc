"""Read samples out of Prometheus text (a gateway's or an engine's /metrics), with
prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` (e.g. `gateway_requests_total`) whose labels include
    `labels`; 0 when there is none (a labelled counter has no sample before its first count)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def scrape(url: str, name: str, **labels: str) -> float:
    """`metric` of the /metrics page of the process at `url`."""
    return metric(httpx.get(url + "/metrics", timeout=10).text, name, **labels)
