"""The test helpers' own behaviour: a poll that times out says what it last saw, metric parsing
sums exactly the samples asked for."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from testkit.metrics import metric
from testkit.poll import eventually, eventually_async

TEXT = """# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{model="a",status="200"} 3.0
gateway_requests_total{model="a",status="429"} 2.0
gateway_requests_total{model="b",status="200"} 5.0
# TYPE engine_num_requests_running gauge
engine_num_requests_running 1.0
"""


def test_metric_sums_the_samples_whose_labels_include_the_ones_asked() -> None:
    assert metric(TEXT, "gateway_requests_total") == 10
    assert metric(TEXT, "gateway_requests_total", model="a") == 5
    assert metric(TEXT, "gateway_requests_total", model="a", status="429") == 2
    assert metric(TEXT, "gateway_requests_total", model="c") == 0
    assert metric(TEXT, "engine_num_requests_running") == 1


def test_eventually_returns_the_first_value_that_holds() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter), lambda n: n >= 3, interval=0) == 3


def test_eventually_fails_with_the_last_value_seen() -> None:
    with pytest.raises(AssertionError, match=r"queue drained did not hold within 0.2s; last: 7"):
        eventually(lambda: 7, lambda n: n == 0, timeout=0.2, interval=0.01, what="queue drained")


def test_eventually_reports_the_last_exception_of_a_probe() -> None:
    def probe() -> int:
        raise ConnectionError("refused")

    with pytest.raises(AssertionError, match=r"last: ConnectionError\('refused'\)"):
        eventually(probe, timeout=0.1, interval=0.01)


def test_eventually_async_polls_a_coroutine() -> None:
    counter = itertools.count()

    async def probe() -> int:
        return next(counter)

    assert asyncio.run(eventually_async(probe, lambda n: n == 2, interval=0)) == 2
    with pytest.raises(AssertionError, match="last: "):
        asyncio.run(eventually_async(probe, lambda n: n < 0, timeout=0.1, interval=0.01))
