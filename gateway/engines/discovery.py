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

While requests wait for a name without an address (its engines scaled to zero: a cold model,
gateway/dispatch/wake.py), `hurry()` resolves it every HURRY_INTERVAL seconds instead, so the
first pod is found within a second of appearing rather than a whole interval later; so does
`urgent()` (the pool's: the name has engines, none healthy: pods loading, or going away).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterator

import dns.asyncresolver
import dns.exception
import dns.resolver

from gateway.settings.discovery import DnsDiscovery

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 5.0  # seconds for one resolution (both record types), however many nameservers
HURRY_INTERVAL = 1.0  # seconds between resolutions while requests wait for the name's first engine

OnChange = Callable[[set[str], set[str]], Awaitable[None] | None]


def address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class DnsWatcher:
    """Resolves one entry's name every interval and reports the difference to `on_change(added,
    removed)` (sets of "host:port"; may be a coroutine function). The first answer is reported
    as all added."""

    def __init__(
        self,
        discovery: DnsDiscovery,
        on_change: OnChange,
        resolver: dns.asyncresolver.Resolver | None = None,
        urgent: Callable[[], bool] | None = None,  # True: resolve every HURRY_INTERVAL for now
    ) -> None:
        self.discovery = discovery
        self.addresses: frozenset[str] = frozenset()
        self._on_change = on_change
        self._resolver = resolver or _resolver(discovery)
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._hurried = 0  # requests waiting for this name's first engine
        self._urgent = urgent
        self._kick = asyncio.Event()
        self.resolved = asyncio.Event()  # set once the first answer has been applied

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"dns-discovery-{self.discovery.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def kick(self) -> None:
        """Resolve now (an engine of this name stopped answering: its pod may be gone)."""
        self._kick.set()

    @contextlib.contextmanager
    def hurry(self) -> Iterator[None]:
        """While in it, the name is resolved at once and then every HURRY_INTERVAL seconds."""
        self._hurried += 1
        if self._hurried == 1:
            self._kick.set()
        try:
            yield
        finally:
            self._hurried -= 1

    async def _run(self) -> None:
        while True:
            self._kick.clear()
            await self.refresh()
            interval = self.discovery.interval
            if self._hurried or (self._urgent is not None and self._urgent()):
                interval = min(interval, HURRY_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), interval)

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


def _resolver(discovery: DnsDiscovery) -> dns.asyncresolver.Resolver:
    """The system's resolver (/etc/resolv.conf: the cluster DNS in a pod), or the entry's own
    `nameserver`."""
    if discovery.nameserver is None:
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [discovery.nameserver[0]]
    resolver.port = discovery.nameserver[1]
    return resolver
