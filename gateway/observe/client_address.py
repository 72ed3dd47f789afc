"""The client's address: the peer's, or from `X-Forwarded-For` when the peer is a trusted proxy.

Anyone can send X-Forwarded-For, so it is read only when the connection comes from a configured
proxy (`logging.trusted_proxies`), right to left: each hop a trusted proxy appended is skipped,
and the first address no trusted proxy vouches for is the client (what nginx's
`real_ip_recursive on` does). A malformed entry stops the walk at the last good hop.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from starlette.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self._trusted = lru_cache(maxsize=1024)(self._check)

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self._networks)

    def of(self, scope: Scope) -> str | None:
        peer = scope.get("client")
        host = peer[0] if peer else None
        if not self._networks or host is None or not self._trusted(host):
            return host
        forwarded = [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
        if not forwarded:
            return host
        hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",")]
        client = host
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # not an address: nothing left of it is believable
            client = hop
            if not self._trusted(hop):
                break
        return client
