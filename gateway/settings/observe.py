"""The `tracing:` and `logging:` sections: OpenTelemetry traces, the access log, Server-Timing.

```yaml
tracing:                       # on when an endpoint is set here or in OTEL_EXPORTER_OTLP_*
  endpoint: http://127.0.0.1:4318   # http/protobuf: /v1/traces is added when the URL has no path;
  protocol: http/protobuf           #   grpc: host:port or http://host:port
  sample_ratio: 1.0                 # of new traces; a client's traceparent decides for its own
  service_name: llm-gateway
  headers: {authorization: "Bearer ..."}  # sent to the collector
  queue_size: 2048                  # spans waiting for export; past it they are dropped (counted)
logging:
  access:
    enabled: true
    format: json                    # or logfmt
    sample: 1.0                     # share of requests written
    file: null                      # standard error; a path: its own file, reopened on SIGHUP
  trusted_proxies: [10.0.0.0/8]     # X-Forwarded-For is believed only from these
  server_timing: false              # a Server-Timing header on inference answers
```

The standard variables work when the file sets no endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
(used as it is), `OTEL_EXPORTER_OTLP_ENDPOINT` (/v1/traces added for http/protobuf),
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_SERVICE_NAME`, and `OTEL_SDK_DISABLED=true` turns tracing off.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.settings.reader import Reader

PROTOCOLS = ("http/protobuf", "grpc")
FORMATS = ("json", "logfmt")


@dataclass(frozen=True)
class TracingSettings:
    endpoint: str | None = None  # the traces URL (http/protobuf) or host:port (grpc); None: off
    protocol: str = "http/protobuf"
    sample_ratio: float = 1.0
    service_name: str = "llm-gateway"
    headers: tuple[tuple[str, str], ...] = ()
    queue_size: int = 2048

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None


@dataclass(frozen=True)
class AccessLogSettings:
    enabled: bool = True
    format: str = "json"
    sample: float = 1.0
    file: str | None = None  # None: standard error


@dataclass(frozen=True)
class LoggingSettings:
    access: AccessLogSettings = field(default_factory=AccessLogSettings)
    trusted_proxies: tuple[str, ...] = ()  # networks, as written (ipaddress.ip_network parses them)
    server_timing: bool = False


def parse_tracing(r: Reader, data: Mapping[str, Any], env: Mapping[str, str]) -> TracingSettings:
    section = r.section(data, "tracing", "")
    r.known(section, "tracing.", ("endpoint", "protocol", "sample_ratio", "service_name", "headers", "queue_size"))
    protocol = r.get(section, "protocol", "tracing.", str, None)
    if protocol is None:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in PROTOCOLS:
        raise r.fail("tracing.protocol", f"must be http/protobuf or grpc, got {protocol!r}")
    endpoint = r.get(section, "endpoint", "tracing.", str, None) or None
    if endpoint is not None:
        endpoint = _endpoint(r, endpoint, protocol, base=True)
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        endpoint = _endpoint(r, env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], protocol, base=False)
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = _endpoint(r, env["OTEL_EXPORTER_OTLP_ENDPOINT"], protocol, base=True)
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        endpoint = None
    raw_headers = section.get("headers")
    if raw_headers is None:
        headers = _env_headers(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS"))
    elif isinstance(raw_headers, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_headers.items()
    ):
        headers = tuple((k.lower(), v) for k, v in raw_headers.items())
    else:
        raise r.fail("tracing.headers", "must be a mapping of header names to strings")
    service = r.get(section, "service_name", "tracing.", str, None) or env.get("OTEL_SERVICE_NAME") or "llm-gateway"
    return TracingSettings(
        endpoint=endpoint,
        protocol=protocol,
        sample_ratio=r.get(section, "sample_ratio", "tracing.", float, 1.0, 0, 1),
        service_name=service,
        headers=headers,
        queue_size=r.get(section, "queue_size", "tracing.", int, 2048, 1),
    )


def _endpoint(r: Reader, url: str, protocol: str, base: bool) -> str:
    """http/protobuf: a full URL, `/v1/traces` added to a base with no path; grpc: host:port."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.fail("tracing.endpoint", f"must be an http(s) URL or host:port, got {url!r}")
    if protocol == "grpc":
        return url
    if base and parts.path in ("", "/"):
        return f"{parts.scheme}://{parts.netloc}/v1/traces"
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _env_headers(raw: str | None) -> tuple[tuple[str, str], ...]:
    """OTEL_EXPORTER_OTLP_HEADERS: `name=value,name=value`, values URL-encoded."""
    pairs = []
    for item in (raw or "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            pairs.append((name.strip().lower(), unquote(value.strip())))
    return tuple(pairs)


def parse_logging(r: Reader, data: Mapping[str, Any], base_dir: Path) -> LoggingSettings:
    section = r.section(data, "logging", "")
    r.known(section, "logging.", ("access", "trusted_proxies", "server_timing"))
    access = r.section(section, "access", "logging.")
    r.known(access, "logging.access.", ("enabled", "format", "sample", "file"))
    fmt = r.get(access, "format", "logging.access.", str, "json")
    if fmt not in FORMATS:
        raise r.fail("logging.access.format", f"must be json or logfmt, got {fmt!r}")
    file = r.get(access, "file", "logging.access.", str, None) or None
    if file is not None and not Path(file).is_absolute():
        file = str(base_dir / file)
    proxies = section.get("trusted_proxies") or []
    if not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies):
        raise r.fail("logging.trusted_proxies", "must be a list of addresses or networks (10.0.0.0/8)")
    for i, network in enumerate(proxies):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise r.fail(f"logging.trusted_proxies[{i}]", f"not an address or network: {network!r}") from None
    return LoggingSettings(
        access=AccessLogSettings(
            enabled=r.get(access, "enabled", "logging.access.", bool, True),
            format=fmt,
            sample=r.get(access, "sample", "logging.access.", float, 1.0, 0, 1),
            file=file,
        ),
        trusted_proxies=tuple(proxies),
        server_timing=r.get(section, "server_timing", "logging.", bool, False),
    )
