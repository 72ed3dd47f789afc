"""The `files:` and `batch:` sections: limits of the Files API and how a replica runs batches.

```yaml
files:
  max_bytes: 209715200          # 200 MiB per upload (413 beyond)
  purge_after: 21600            # uploads cut short (a crash) are removed after this many seconds
  purge_interval: 600
batch:
  max_lines: 50000              # lines per input file (a validation error beyond)
  concurrency: 16               # lines in flight per gateway process; 0: this process runs none
  max_batches: 4                # batches one process runs at once (they share `concurrency`)
  claim_size: 8                 # lines claimed from the store in one step
  lease_ttl: 30                 # a dead runner's batch is taken over after this long
  claim_ttl: 60                 # a dead runner's claimed lines run again after this long
  poll_interval: 1.0            # how often an idle process looks for work
  cancel_grace: 30              # a cancelled batch waits this long for its lines in flight
  min_completion_window: 86400  # "24h", OpenAI's only window; lower it in tests ("10s")
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader, simple_section


@dataclass(frozen=True)
class FilesSettings:
    max_bytes: int = 200 * 1024 * 1024
    purge_after: float = 21600.0
    purge_interval: float = 600.0


@dataclass(frozen=True)
class BatchSettings:
    max_lines: int = 50_000
    concurrency: int = 16
    max_batches: int = 4
    claim_size: int = 8
    lease_ttl: float = 30.0
    claim_ttl: float = 60.0
    poll_interval: float = 1.0
    cancel_grace: float = 30.0
    min_completion_window: int = 86400


def parse_files(r: Reader, data: Mapping[str, Any]) -> FilesSettings:
    files: FilesSettings = simple_section(r, data, "files", FilesSettings)
    if files.max_bytes < 1:
        raise r.fail("files.max_bytes", "must be at least 1")
    if files.purge_interval <= 0:
        raise r.fail("files.purge_interval", "must be > 0")
    return files


def parse_batch(r: Reader, data: Mapping[str, Any]) -> BatchSettings:
    batch: BatchSettings = simple_section(r, data, "batch", BatchSettings)
    for name in ("max_lines", "max_batches", "claim_size", "min_completion_window"):
        if getattr(batch, name) < 1:
            raise r.fail(f"batch.{name}", "must be at least 1")
    for name in ("lease_ttl", "claim_ttl", "poll_interval"):
        if getattr(batch, name) <= 0:
            raise r.fail(f"batch.{name}", "must be > 0")
    # A runner renews its lease and extends its claims between polls: both must outlast a few.
    for name in ("lease_ttl", "claim_ttl"):
        if getattr(batch, name) < 3 * batch.poll_interval:
            raise r.fail(f"batch.{name}", f"must be at least 3 x batch.poll_interval ({3 * batch.poll_interval:g} s)")
    return batch


def batch_client_settings(url: str | None, key: str | None) -> tuple[str, str | None]:
    """For the `batch` CLI: the gateway's address and the client's API key, from flags or the
    environment (GATEWAY_URL, GATEWAY_API_KEY)."""
    base = url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8080"
    return base.rstrip("/"), key or os.environ.get("GATEWAY_API_KEY") or None
