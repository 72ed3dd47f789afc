"""The `server:` section: where the gateway listens, how it limits connections, how it drains.

Besides the listen address and the upstream timeouts, it holds what operations need: TLS, a
separate admin listener (`admin_port`), limits on what a client connection may hold (header
size, header/body/keep-alive timeouts, connections per process) and the graceful drain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.settings.reader import Reader, dataclass_fields


@dataclass(frozen=True)
class TlsSettings:
    cert: str  # PEM certificate chain served on both listeners
    key: str  # PEM private key of that certificate


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout: float = 5.0  # seconds to connect to an engine
    first_byte_timeout: float = 120.0  # streaming: seconds until the engine's response headers arrive
    idle_timeout: float = 60.0  # streaming: the longest gap, in seconds, between two chunks of an engine
    request_timeout: float = 600.0  # non-streaming: seconds for the engine's whole answer
    send_timeout: float = 30.0  # a client that reads nothing for this long is dropped
    admin_host: str | None = None  # the admin listener's address (default: host)
    admin_port: int | None = None  # serve /admin, /ui and /metrics on this port only (404 on `port`)
    tls: TlsSettings | None = None  # {cert, key}: serve HTTPS on both listeners
    max_header_bytes: int = 64 * 1024  # request line and headers; more is answered 431
    header_timeout: float = 10.0  # a request's headers must arrive within this (else 408)
    body_timeout: float = 60.0  # a request's body must arrive within this after its headers (else 408)
    keepalive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 10000  # per worker process; a connection over it gets 503 (admin port exempt)
    drain_grace: float = 5.0  # SIGTERM: keep accepting connections this long (/ready is 503 at once)
    drain_timeout: float = 30.0  # SIGTERM: in-flight work may finish until this many seconds after it

    @property
    def admin_address(self) -> str:
        return self.admin_host or self.host


_POSITIVE = ("header_timeout", "body_timeout", "keepalive_timeout", "max_header_bytes", "max_connections")


def parse_server(r: Reader, data: Mapping[str, Any], base_dir: Path | None = None) -> ServerSettings:
    section = r.section(data, "server", "")
    r.known(section, "server.", dataclass_fields(ServerSettings))
    defaults = ServerSettings()
    values: dict[str, Any] = {}
    for key in dataclass_fields(ServerSettings):
        if key in ("tls", "admin_host", "admin_port"):
            continue
        default = getattr(defaults, key)
        kind = type(default)
        values[key] = r.get(section, key, "server.", kind, default, 0 if kind is not str else None)
    for key in _POSITIVE:
        if values[key] <= 0:
            raise r.fail(f"server.{key}", f"must be > 0, got {values[key]!r}")
    if values["workers"] < 1:
        raise r.fail("server.workers", "must be at least 1")
    values["admin_host"] = r.get(section, "admin_host", "server.", str, None) or None
    values["admin_port"] = r.get(section, "admin_port", "server.", int, None, 1, 65535)
    if values["admin_port"] is not None and values["admin_port"] == values["port"]:
        raise r.fail("server.admin_port", f"must differ from server.port ({values['port']})")
    if values["drain_grace"] > values["drain_timeout"]:
        raise r.fail("server.drain_grace", f"must be <= server.drain_timeout ({values['drain_timeout']:g})")
    values["tls"] = _tls(r, section.get("tls"), base_dir or Path.cwd())
    return ServerSettings(**values)


def _tls(r: Reader, data: Any, base_dir: Path) -> TlsSettings | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise r.fail("server.tls", "must be a mapping {cert: FILE, key: FILE}")
    r.known(data, "server.tls.", ("cert", "key"))
    files = {}
    for key in ("cert", "key"):
        value = r.get(data, key, "server.tls.", str, None)
        if not value:
            raise r.fail(f"server.tls.{key}", "is required (a PEM file)")
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise r.fail(f"server.tls.{key}", f"no such file: {path}")
        files[key] = str(path)
    return TlsSettings(**files)
