"""Hostile identifiers (issue 20) fuzzed on both store backends: the fuzz rig (tests/fuzz_rig.py: two
replicas, a private Redis, a fake engine) on SQLite and on PostgreSQL, attacked with ids, cursors,
names and upload filenames holding control characters (tests/hostile_ids.py), then with the
general Files and Batches fuzz. Every hostile identifier must be a 400 naming its parameter, no
answer a 500, and the replicas' logs must hold no raw control character and no forged line."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from io import StringIO
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.text import SafeFormatter
from gateway.process.worker import LOG_FORMAT
from testkit.fuzz_rig import after_checks, rig
from testkit.hostile import cases, learn, problem, send
from testkit.redis_server import private_redis
from testkit.stores import fresh_database
from tests.hostile_ids import FORGED, id_cases, id_problem, log_problems
from tests.test_fuzz import fuzz_settings


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hostile_identifiers_are_400s_on_both_stores(logs_dir: Path, backend: str) -> None:
    with ExitStack() as stack:
        store_url = "sqlite:///fuzz.db"
        if backend == "postgresql":
            store_url = stack.enter_context(fresh_database("gateway_fuzz_ids"))
        redis = stack.enter_context(private_redis(logs_dir / f"ids-redis-{backend}"))
        world, replicas = stack.enter_context(rig(logs_dir, redis, name=f"ids-{backend}", store_url=store_url))
        client = stack.enter_context(httpx.Client(timeout=60))
        sent = {"ids": 0, "files": 0}

        @fuzz_settings(300)
        @given(data=st.data())
        def hostile_ids(data: st.DataObject) -> None:
            sent["ids"] += 1
            case, param = data.draw(id_cases(world))
            trouble = id_problem(param, send(client, world, case))
            assert trouble is None, f"{trouble}\nrequest: {case.describe()}"

        @fuzz_settings(300)
        @given(data=st.data())
        def files_and_batches(data: st.DataObject) -> None:
            sent["files"] += 1
            case = data.draw(cases(world, "files"))
            response = send(client, world, case)
            trouble = problem(case, response)
            assert trouble is None, f"{trouble}\nrequest: {case.describe()}"
            learn(world, case, response)

        hostile_ids()
        files_and_batches()
        assert sent["ids"] >= 300 and sent["files"] >= 300  # the whole budget was spent
        assert after_checks(world, replicas) == []
        for proc in replicas:
            assert log_problems(proc.log_path.read_text(errors="replace")) == [], proc.name


def test_a_log_record_stays_one_record() -> None:
    """The gateway's formatter (installed by configure_logging in every process) on a real logger:
    a client value with CR, LF, NUL and ESC, and an exception whose message holds a forged line."""
    out = StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    logger = logging.getLogger("tests.safe_log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("no such file: %s", "x\r\n" + FORGED + "\x00\x1b[2J")
        try:
            raise ValueError("bad id\n" + FORGED)
        except ValueError:
            logger.exception("failed on %s", "/v1/files/\n" + FORGED)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert log_problems(text) == []
    lines = text.rstrip("\n").split("\n")
    assert lines[0].endswith("no such file: x\\x0d\\x0a" + FORGED + "\\x00\\x1b[2J")
    records = [line for line in lines if not line.startswith("  ")]
    assert len(records) == 2 and records[1].endswith("failed on /v1/files/\\x0a" + FORGED)
    assert "  ValueError: bad id" in lines and "  " + FORGED in lines  # indented: not a record of its own
