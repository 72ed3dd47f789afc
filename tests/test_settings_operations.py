"""The operations settings: server limits, drain, TLS, admin port; engines' idle_stop, cold_start_timeout, ca_file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ConfigError, parse_settings


def config(server: dict[str, Any] | None = None, **engine: Any) -> dict[str, Any]:
    base = {"name": "e", "kind": "cpu", "model": "m", "port": 9001}
    return {
        "server": server or {},
        "engines": [{**base, **engine}],
        "models": [{"name": "m", "routes": [{"engine": "e"}]}],
        "auth": {"enabled": False},
    }


def fails(data: dict[str, Any], where: str, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(data, "c.yaml", base_dir=base_dir, env={})
    assert f"c.yaml: {where}:" in str(caught.value), str(caught.value)
    return str(caught.value)


def test_defaults() -> None:
    s = parse_settings(config(), "c.yaml", env={})
    server, engine = s.server, s.engines[0]
    assert (server.max_header_bytes, server.header_timeout, server.body_timeout) == (65536, 10.0, 60.0)
    assert (server.keepalive_timeout, server.max_connections) == (5.0, 10000)
    assert (server.drain_grace, server.drain_timeout, server.admin_port, server.tls) == (5.0, 30.0, None, None)
    assert engine.idle_stop is None and engine.wake_timeout == engine.startup_timeout == 120.0


def test_server_values_are_checked() -> None:
    fails(config({"admin_port": 8080}), "server.admin_port")  # the public port's default
    fails(config({"admin_port": 70000}), "server.admin_port")
    fails(config({"drain_grace": 10, "drain_timeout": 5}), "server.drain_grace")
    fails(config({"header_timeout": 0}), "server.header_timeout")
    fails(config({"max_connections": 0}), "server.max_connections")
    fails(config({"max_header_bytes": "big"}), "server.max_header_bytes")
    fails(config({"tls": "yes"}), "server.tls")
    fails(config({"tls": {"cert": "c.pem"}}), "server.tls.cert")  # no such file
    fails(config({"tls": {"cert": "c.pem", "key": "k.pem", "ca": "x"}}), "server.tls.ca")
    s = parse_settings(config({"admin_port": 9090, "admin_host": "0.0.0.0", "drain_timeout": 60}), "c", env={})
    assert (s.server.admin_port, s.server.admin_address, s.server.drain_timeout) == (9090, "0.0.0.0", 60.0)


def test_tls_files_are_resolved_from_the_project(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    s = parse_settings(config({"tls": {"cert": "cert.pem", "key": "key.pem"}}), "c", base_dir=tmp_path, env={})
    assert s.server.tls is not None and s.server.tls.cert == str(tmp_path / "cert.pem")
    fails(config({"tls": {"cert": "cert.pem"}}), "server.tls.key", base_dir=tmp_path)


def test_engine_operations_keys(tmp_path: Path) -> None:
    s = parse_settings(config(idle_stop=30, cold_start_timeout=15), "c", env={})
    assert s.engines[0].idle_stop == 30.0 and s.engines[0].wake_timeout == 15.0
    fails(config(idle_stop=0), "engines[0].idle_stop")
    remote = {"kind": "openai", "url": "http://10.0.0.1:8000", "model": None, "port": None}
    fails(config(**remote, idle_stop=30), "engines[0].idle_stop")
    fails(config(**remote, ca_file="ca.pem"), "engines[0].ca_file")  # not https
    fails(config(**{**remote, "url": "https://h:1"}, ca_file="ca.pem"), "engines[0].ca_file")  # no such file
    (tmp_path / "ca.pem").write_text("x")
    s = parse_settings(config(**{**remote, "url": "https://h:1"}, ca_file="ca.pem"), "c", base_dir=tmp_path, env={})
    assert s.engines[0].ca_file == str(tmp_path / "ca.pem")
