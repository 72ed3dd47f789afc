"""The suite's shared process fixtures: a folder for logs, the tiny CPU engine worker, and the fake
engine (testkit/fake_upstream.py) most gateway tests route to.

Registered as a plugin in tests/conftest.py. Session fixtures are per process: under
pytest-xdist each worker starts its own, on ports of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.ci import require
from testkit.procs import TINY_MODEL, Proc, fake_upstream, running, worker


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_worker(logs_dir: Path) -> Iterator[Proc]:
    require((TINY_MODEL / "config.json").exists(), f"tiny model missing at {TINY_MODEL}")
    with running(worker(logs_dir, "--model", str(TINY_MODEL), name="tiny")) as proc:
        yield proc


@pytest.fixture(scope="module")
def fake_engine(logs_dir: Path, request: pytest.FixtureRequest) -> Iterator[Proc]:
    """A fake engine serving model `fake` with 4 chunks an answer, for one module."""
    name = f"fake-{request.module.__name__.rsplit('.', 1)[-1]}"
    with running(fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", name=name)) as proc:
        yield proc
