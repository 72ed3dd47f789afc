"""Where the running configuration comes from: the file given to `--config`, with the command
line's overrides (`--host`, `--port`, `--workers`), read the same way at start and at every reload.

A configuration's version names what it was read from: a hash of the file's text and of the
files it names whose contents the gateway uses while it runs (the TLS certificate and key, the
engines' CA bundles). Reading the same file twice gives the same version, on every replica that
has the same files; a renewed certificate under the same path gives a new one.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from gateway.settings import ConfigError, Settings, parse_text, read_config

VERSION_CHARS = 12


@dataclass(frozen=True)
class Loaded:
    """A configuration read and validated whole: its settings, its text, its version."""

    settings: Settings
    text: str
    version: str


@dataclass(frozen=True)
class ConfigSource:
    path: str
    host: str | None = None  # the command line's, over the file's server.host
    port: int | None = None
    workers: int | None = None

    def load(self, env: Mapping[str, str] | None = None) -> Loaded:
        """The file read now; ConfigError with the precise message when it is not valid."""
        return self.parse(read_config(self.path), env)

    def parse(self, text: str, env: Mapping[str, str] | None = None) -> Loaded:
        """`text` as if it were the file's (a worker parses what the main process read)."""
        settings = self._overridden(parse_text(text, self.path, env))
        check_tls(settings)
        return Loaded(settings, text, version_of(text, settings))

    def _overridden(self, settings: Settings) -> Settings:
        s = settings.server
        server = replace(s, host=self.host or s.host, port=self.port or s.port, workers=self.workers or s.workers)
        if server.admin_port is not None and server.admin_port == server.port:
            raise ConfigError(f"--port {server.port} is also server.admin_port; give them different ports")
        return replace(settings, server=server)


def check_tls(settings: Settings) -> None:
    """The certificate and key of `server.tls` load as a pair (a key that does not match its
    certificate, a file that is not PEM, are refused here, not at the first handshake)."""
    tls = settings.server.tls
    if tls is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings.source}: server.tls: cannot load {tls.cert} and {tls.key}: {exc}") from None


def version_of(text: str, settings: Settings) -> str:
    digest = hashlib.sha256(text.encode())
    for path in _used_files(settings):
        digest.update(b"\0" + path.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"(unreadable)")
    return digest.hexdigest()[:VERSION_CHARS]


def _used_files(settings: Settings) -> Iterator[str]:
    if settings.server.tls is not None:
        yield settings.server.tls.cert
        yield settings.server.tls.key
    yield from sorted({e.ca_file for e in settings.engines if e.ca_file})
