"""The `store`, `files` and `batch` sections of the config: defaults and errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ConfigError, parse_settings
from tests.test_settings import base


def test_defaults_serve_batches_from_sqlite_under_data(tmp_path: Path) -> None:
    s = parse_settings(base(), base_dir=tmp_path, env={})
    assert s.store.url == "sqlite:///gateway.db" and s.store.sqlite_path == tmp_path / "data" / "gateway.db"
    assert s.files.max_bytes == 200 * 1024 * 1024 and s.batch.max_lines == 50_000
    assert s.batch.concurrency == 16 and s.batch.min_completion_window == 86400
    pg = parse_settings(base(), env={"GATEWAY_STORE_URL": "postgresql://gw@db/gw"})
    assert pg.store.backend == "postgresql"


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        (base(store={"url": "mysql://x"}), "store.url"),
        (base(store={"path": "x"}), "store.path"),
        (base(files={"max_bytes": 0}), "files.max_bytes"),
        (base(files={"max_bytes": "big"}), "files.max_bytes"),
        (base(batch={"max_lines": 0}), "batch.max_lines"),
        (base(batch={"concurrency": -1}), "batch.concurrency"),
        (base(batch={"claim_ttl": 1, "poll_interval": 1}), "batch.claim_ttl"),
        (base(batch={"lease_ttl": 0}), "batch.lease_ttl"),
        (base(batch={"workers": 3}), "batch.workers"),
    ],
)
def test_errors_name_the_key(cfg: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg, "my.yaml", env={})
    assert str(info.value).startswith(f"my.yaml: {where}:"), str(info.value)
