"""TLS towards the engines: an `https://` engine is verified, against its `ca_file` when it names one.

One SSL context per CA file, built once: contexts are costly to build and safe to share.
"""

from __future__ import annotations

import functools
import ssl

from gateway.settings import EngineSettings


@functools.cache
def _context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def engine_ssl(engine: EngineSettings) -> ssl.SSLContext | bool:
    """What aiohttp's `ssl=` takes for this engine: the CA file's context, or True (verify
    against the system's CAs; plain http:// ignores it)."""
    return _context(engine.ca_file) if engine.ca_file else True


def forget() -> None:
    """A reload: the CA files are read again at their next use (a renewed bundle, same path)."""
    _context.cache_clear()
