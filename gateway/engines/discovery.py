"""Engines found by DNS: `discover: dns` turns one config entry into one engine per address.

    engines:
      - {name: vllm, kind: openai, discover: dns, host: vllm.llm.svc.cluster.local, port: 8000,
         discover_interval: 10}

Every address the name resolves to (A and AAAA records: a Kubernetes headless Service answers
with the address of each of its pods) becomes an engine at `http://address:port`. The name is
resolved again every `discover_interval` seconds and engines are added and removed as the answer
changes, with no restart. An answer that there is no such name or no address (NXDOMAIN, no
records) is an answer: every engine of the entry goes. A failed resolution (timeout, SERVFAIL, no
resolver) is not: the last answer stands, and it is logged once until resolution works again.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.exception
import dns.resolver

from gateway.settings.discovery import DnsDiscovery

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 5.0  # seconds for one resolution (both record types), however many nameservers

OnChange = Callable[[set[str], set[str]], Awaitable[None] | None]


def address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class DnsWatcher:
    """Resolves one entry's name every interval and reports the difference to `on_change(added,
    removed)` (sets of "host:port"; may be a coroutine function). The first answer is reported
    as all added."""

    def __init__(
        self, discovery: DnsDiscovery, on_change: OnChange, resolver: dns.asyncresolver.Resolver | None = None
    ) -> None:
        self.discovery = discovery
        self.addresses: frozenset[str] = frozenset()
        self._on_change = on_change
        self._resolver = resolver or dns.asyncresolver.Resolver()  # the system's /etc/resolv.conf
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.resolved = asyncio.Event()  # set once the first answer has been applied

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"dns-discovery-{self.discovery.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.discovery.interval)

    async def refresh(self) -> None:
        """Resolve now and apply the answer; a failure keeps the last one."""
        try:
            found = await self.resolve()
        except (dns.exception.DNSException, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "engine discovery %s: cannot resolve %s (%s); keeping the %d engines it had",
                    self.discovery.name,
                    self.discovery.host,
                    exc,
                    len(self.addresses),
                )
            return
        if self._failing:
            self._failing = False
            log.warning("engine discovery %s: %s resolves again", self.discovery.name, self.discovery.host)
        added, removed = set(found - self.addresses), set(self.addresses - found)
        self.addresses = found
        if added or removed:
            log.info("engine discovery %s: +%s -%s", self.discovery.name, sorted(added), sorted(removed))
            outcome = self._on_change(added, removed)
            if inspect.isawaitable(outcome):
                await outcome
        self.resolved.set()

    async def resolve(self) -> frozenset[str]:
        """Every A and AAAA address of the name, as "address:port". Raises on a failed lookup;
        no such name, or no records of either type, is an empty answer."""
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            answers = await asyncio.gather(self._lookup("A"), self._lookup("AAAA"))
        return frozenset(address(ip, self.discovery.port) for ips in answers for ip in ips)

    async def _lookup(self, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(self.discovery.host, rdtype, search=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [rdata.to_text() for rdata in answer]
