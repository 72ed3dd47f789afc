"""The `inference_log:` section (one row per request in the store) and a model's `log_payloads`.

```yaml
inference_log:
  enabled: true          # one row per request, written in the background
  flush_interval: 0.5    # seconds between writes
  flush_rows: 1000       # ... or sooner, once this many rows wait
  buffer_size: 20000     # rows held while the store is slow; past this, rows are dropped (counted)
  retention_days: 30     # rows older than this are deleted (checked hourly); 0 keeps them forever
models:
  - name: tiny-llama
    routes: [{engine: cpu-0}]
    log_payloads:        # off unless given
      sample: 0.01       # share of requests whose bodies are captured (0 to 1)
      redact: [api_key, "re:\\b\\d{16}\\b"]   # field names, or re:REGEX for text inside strings
      max_bytes: 65536   # a captured response is cut past this many bytes
```

`redact` takes two kinds of entries. A plain name (`api_key`) redacts every JSON object key of
that exact name, at any depth of the request and the response: its value, whatever it is,
becomes `"[redacted]"`. An entry starting `re:` is a Python regular expression: every match in
every string value (keys are left alone) of the request and the response becomes `[redacted]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader, simple_section

REGEX_PREFIX = "re:"
MAX_REDACT_ENTRIES = 64


@dataclass(frozen=True)
class InferenceLogSettings:
    enabled: bool = True
    flush_interval: float = 0.5
    flush_rows: int = 1000
    buffer_size: int = 20000
    retention_days: float = 30.0


@dataclass(frozen=True)
class PayloadCapture:
    """A model's `log_payloads`: a sampled share of its request and response bodies, redacted."""

    sample: float
    redact: tuple[str, ...] = ()
    max_bytes: int = 65536

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(e for e in self.redact if not e.startswith(REGEX_PREFIX))

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(e[len(REGEX_PREFIX) :]) for e in self.redact if e.startswith(REGEX_PREFIX))


def parse_inference_log(r: Reader, data: Mapping[str, Any]) -> InferenceLogSettings:
    settings: InferenceLogSettings = simple_section(r, data, "inference_log", InferenceLogSettings)
    if settings.flush_interval <= 0:
        raise r.fail("inference_log.flush_interval", "must be > 0 seconds")
    if settings.flush_rows < 1:
        raise r.fail("inference_log.flush_rows", "must be at least 1")
    if settings.buffer_size < settings.flush_rows:
        raise r.fail("inference_log.buffer_size", f"must be at least flush_rows ({settings.flush_rows})")
    return settings


def parse_log_payloads(r: Reader, path: str, data: Any) -> PayloadCapture | None:
    """`models[i].log_payloads`; None (no capture) when absent."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise r.fail(path, "must be a mapping: {sample: 0.01, redact: [...]}")
    r.known(data, f"{path}.", ("sample", "redact", "max_bytes"))
    if "sample" not in data:
        raise r.fail(f"{path}.sample", "is required: the share of requests to capture, 0 to 1")
    sample = r.get(data, "sample", f"{path}.", float, None, 0, 1)
    max_bytes = r.get(data, "max_bytes", f"{path}.", int, PayloadCapture.max_bytes, 1)
    redact = data.get("redact") or []
    if not isinstance(redact, list) or not all(isinstance(e, str) and e for e in redact):
        raise r.fail(f"{path}.redact", "must be a list of field names or re:REGEX strings")
    if len(redact) > MAX_REDACT_ENTRIES:
        raise r.fail(f"{path}.redact", f"at most {MAX_REDACT_ENTRIES} entries")
    for i, entry in enumerate(redact):
        if entry.startswith(REGEX_PREFIX):
            try:
                re.compile(entry[len(REGEX_PREFIX) :])
            except re.error as exc:
                raise r.fail(f"{path}.redact[{i}]", f"not a valid regular expression: {exc}") from None
    return PayloadCapture(sample=sample, redact=tuple(redact), max_bytes=max_bytes)
