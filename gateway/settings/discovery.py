"""`discover: dns` in an engine entry: the keys that turn one entry into one engine per address
(gateway/engines/discovery.py does the resolving)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DISCOVERY_KEYS = ("discover", "host", "port", "discover_interval", "scheme", "nameserver")
DEFAULT_INTERVAL = 10.0
DNS_PORT = 53


@dataclass(frozen=True)
class DnsDiscovery:
    """One `discover: dns` engine entry."""

    name: str
    host: str
    port: int
    interval: float = DEFAULT_INTERVAL
    scheme: str = "http"
    # The DNS server asked, as (address, port); None: the system's resolver (/etc/resolv.conf).
    # For a name served elsewhere than the cluster DNS, e.g. Consul's DNS interface on :8600.
    nameserver: tuple[str, int] | None = None

    def url(self, address: str) -> str:
        """`address` as discovery reports it (`10.1.2.3:8000`, `[fd00::3]:8000`) -> the engine URL."""
        return f"{self.scheme}://{address}"

    def engine_name(self, address: str) -> str:
        """A stable, readable name per discovered engine (metrics label it; bounded by the pods)."""
        return f"{self.name}@{address}"


def parse_dns_discovery(data: Mapping[str, Any], path: str) -> DnsDiscovery | None:
    """The discovery keys of one engine entry (`path` like "engines[0]."); None without `discover`.
    The entry's other keys (name, kind, health_path, ...) are the engine parser's business.
    Raises ValueError("engines[0].port: must be ..."): the settings loader adds the file name."""
    if "discover" not in data:
        for key in ("host", "discover_interval", "scheme", "nameserver"):  # `port` is a managed engine's key too
            if key in data:
                raise ValueError(f"{path}{key}: only an engine with discover: dns takes it")
        return None

    def fail(key: str, problem: str) -> ValueError:
        return ValueError(f"{path}{key}: {problem}")

    if data["discover"] != "dns":
        raise fail("discover", f"must be dns, got {data['discover']!r}")
    if data.get("kind", "openai") != "openai":
        raise fail("kind", "a discovered engine is reached over the network: kind must be openai")
    if "url" in data:
        raise fail("url", "a discovered engine has host and port instead of url")
    name, host, port = data.get("name"), data.get("host"), data.get("port")
    if not isinstance(name, str) or not name:
        raise fail("name", "is required")
    if not isinstance(host, str) or not host.strip() or "/" in host or ":" in host:
        raise fail("host", f"must be a DNS name (no scheme, no port), got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise fail("port", f"must be a port number (1-65535), got {port!r}")
    interval = data.get("discover_interval", DEFAULT_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise fail("discover_interval", f"must be a number of seconds > 0, got {interval!r}")
    scheme = data.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise fail("scheme", f"must be http or https, got {scheme!r}")
    nameserver = data.get("nameserver")
    if nameserver is not None:
        nameserver = _nameserver(nameserver, fail)
    return DnsDiscovery(name, host.strip().rstrip("."), port, float(interval), scheme, nameserver)


def _nameserver(value: Any, fail: Callable[[str, str], ValueError]) -> tuple[str, int]:
    """`10.0.0.10`, `10.0.0.10:8600`, `fd00::a` or `[fd00::a]:8600` -> (address, port)."""
    problem = f"must be an IP address with an optional :port (10.0.0.10:8600, [fd00::a]:8600), got {value!r}"
    if not isinstance(value, str):
        raise fail("nameserver", problem)
    text, port = value.strip(), DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise fail("nameserver", problem)
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, digits = text.partition(":")
        if not digits.isdigit():
            raise fail("nameserver", problem)
        port = int(digits)
    else:
        host = text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise fail("nameserver", problem) from None
    if not 0 < port < 65536:
        raise fail("nameserver", problem)
    return host, port
