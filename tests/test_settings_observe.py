"""The `tracing:` and `logging:` sections (gateway/settings/observe.py), and the client address read
from X-Forwarded-For through trusted proxies only (gateway/observe/client_address.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.observe.observer import ClientAddress
from gateway.settings import ConfigError, Settings, parse_settings

BASE: dict[str, Any] = {
    "auth": {"enabled": False},
    "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
    "models": [{"name": "m", "routes": [{"engine": "e"}]}],
}


def parsed(env: dict[str, str] | None = None, **sections: Any) -> Settings:
    return parse_settings({**BASE, **sections}, "test.yaml", base_dir=Path("/srv/gw"), env=env or {})


def test_tracing_is_off_by_default_and_the_access_log_on() -> None:
    s = parsed()
    assert s.tracing.endpoint is None and not s.tracing.enabled
    assert s.logging.access.enabled and s.logging.access.format == "json" and s.logging.access.file is None
    assert not s.logging.server_timing and s.logging.trusted_proxies == ()


@pytest.mark.parametrize(
    ("tracing", "env", "endpoint", "protocol"),
    [
        ({"endpoint": "http://collector:4318"}, {}, "http://collector:4318/v1/traces", "http/protobuf"),
        ({"endpoint": "http://collector:4318/custom"}, {}, "http://collector:4318/custom", "http/protobuf"),
        ({"endpoint": "collector:4317", "protocol": "grpc"}, {}, "collector:4317", "grpc"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces", "http/protobuf"),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/x"}, "http://c:4318/x", "http/protobuf"),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http://c:4317",
            "grpc",
        ),
        (
            {"endpoint": "http://file:4318"},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"},
            "http://file:4318/v1/traces",
            "http/protobuf",
        ),
        ({"endpoint": "http://c:4318"}, {"OTEL_SDK_DISABLED": "true"}, None, "http/protobuf"),
    ],
)
def test_the_endpoint_from_the_file_or_the_environment(
    tracing: dict[str, Any], env: dict[str, str], endpoint: str | None, protocol: str
) -> None:
    s = parsed(env, tracing=tracing)
    assert (s.tracing.endpoint, s.tracing.protocol) == (endpoint, protocol)


def test_headers_service_name_and_ratio() -> None:
    s = parsed(
        {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b,x=y", "OTEL_SERVICE_NAME": "gw-env"},
        tracing={"endpoint": "http://c:4318", "sample_ratio": 0.25},
    )
    assert s.tracing.headers == (("api-key", "a b"), ("x", "y")) and s.tracing.service_name == "gw-env"
    assert s.tracing.sample_ratio == 0.25
    s = parsed(tracing={"endpoint": "http://c:4318", "headers": {"Authorization": "Bearer t"}, "service_name": "g"})
    assert s.tracing.headers == (("authorization", "Bearer t"),) and s.tracing.service_name == "g"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"tracing": {"protocol": "thrift"}}, "tracing.protocol: must be http/protobuf or grpc"),
        ({"tracing": {"endpoint": "ftp://x"}}, "tracing.endpoint: must be an http(s) URL or host:port"),
        ({"tracing": {"sample_ratio": 2}}, "tracing.sample_ratio: must be <= 1"),
        ({"tracing": {"headers": ["a"]}}, "tracing.headers: must be a mapping"),
        ({"tracing": {"queue_size": 0}}, "tracing.queue_size: must be >= 1"),
        ({"logging": {"access": {"format": "xml"}}}, "logging.access.format: must be json or logfmt"),
        ({"logging": {"access": {"sample": -1}}}, "logging.access.sample: must be >= 0"),
        ({"logging": {"trusted_proxies": ["10.0.0.0/33"]}}, "logging.trusted_proxies[0]: not an address or network"),
        ({"logging": {"trusted_proxies": "10.0.0.1"}}, "logging.trusted_proxies: must be a list"),
        ({"logging": {"server_timing": "yes"}}, "logging.server_timing: must be bool"),
    ],
)
def test_bad_values_are_named(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parsed(**sections)


def test_a_relative_access_log_file_is_under_the_project_root() -> None:
    assert parsed(logging={"access": {"file": "logs/access.log"}}).logging.access.file == "/srv/gw/logs/access.log"


def scope(peer: str, *forwarded: str) -> dict[str, Any]:
    return {"client": (peer, 1234), "headers": [(b"x-forwarded-for", f.encode()) for f in forwarded]}


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    none = ClientAddress(())
    assert none.of(scope("10.0.0.5", "203.0.113.9")) == "10.0.0.5"
    trusted = ClientAddress(("10.0.0.0/8", "::1"))
    assert trusted.of(scope("198.51.100.2", "203.0.113.9")) == "198.51.100.2"  # peer not trusted
    assert trusted.of(scope("10.0.0.5", "203.0.113.9")) == "203.0.113.9"
    # right to left: hops appended by trusted proxies are skipped, a spoofed left part is not reached
    assert trusted.of(scope("10.0.0.5", "1.2.3.4, 203.0.113.9, 10.1.1.1")) == "203.0.113.9"
    assert trusted.of(scope("10.0.0.5", "1.2.3.4", "203.0.113.9")) == "203.0.113.9"  # two header lines
    assert trusted.of(scope("10.0.0.5", "garbage, 10.2.2.2")) == "10.2.2.2"  # stops at what is not an address
    assert trusted.of(scope("::1", "2001:db8::7")) == "2001:db8::7"
    assert trusted.of(scope("10.0.0.5")) == "10.0.0.5"
    assert trusted.of({"client": None, "headers": []}) is None
