"""DNS engine discovery (gateway/engines/discovery.py) against a real DNS server the test runs on
127.0.0.1 and whose answer it changes: engines come and go with the answer, a failed resolution
keeps the last answer and is logged once."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Mapping
from typing import Any

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from gateway.engines.discovery import DnsWatcher
from gateway.settings.discovery import DnsDiscovery, parse_dns_discovery

NAME = "vllm.llm.svc.test"


class TinyDns(asyncio.DatagramProtocol):
    """An authoritative server for one name, over UDP: answers A and AAAA from `ips`, or SERVFAIL,
    or nothing at all, as the test says."""

    def __init__(self) -> None:
        self.ips: list[str] = []
        self.exists = True
        self.mode = "answer"  # or "servfail", "silent"
        self.queries = 0
        self.asked = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        self.asked.set()
        query = dns.message.from_wire(data)
        if self.mode == "silent":
            return
        response = dns.message.make_response(query)
        question = query.question[0]
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif question.name.to_text().rstrip(".") != NAME or not self.exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            v6 = question.rdtype == dns.rdatatype.AAAA
            ips = [ip for ip in self.ips if (":" in ip) == v6]
            if ips:
                rdtype = dns.rdatatype.to_text(question.rdtype)
                response.answer.append(dns.rrset.from_text(question.name, 5, "IN", rdtype, *ips))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


class Changes:
    def __init__(self) -> None:
        self.engines: set[str] = set()
        self.calls: list[tuple[set[str], set[str]]] = []
        self.changed = asyncio.Event()

    async def __call__(self, added: set[str], removed: set[str]) -> None:
        assert not added & self.engines and removed <= self.engines
        self.engines = (self.engines | added) - removed
        self.calls.append((added, removed))
        self.changed.set()

    async def next(self) -> tuple[set[str], set[str]]:
        async with asyncio.timeout(10):
            await self.changed.wait()
        self.changed.clear()
        return self.calls[-1]


async def serve() -> tuple[TinyDns, asyncio.DatagramTransport, dns.asyncresolver.Resolver]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(TinyDns, local_addr=("127.0.0.1", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = transport.get_extra_info("sockname")[1]
    resolver.lifetime = 0.5  # a silent server fails fast
    return server, transport, resolver


def test_parse_dns_discovery() -> None:
    entry: dict[str, Any] = {"name": "vllm", "kind": "openai", "discover": "dns", "host": "vllm.llm.svc", "port": 8000}
    assert parse_dns_discovery(entry, "engines[0].") == DnsDiscovery("vllm", "vllm.llm.svc", 8000, 10.0, "http")
    found = parse_dns_discovery({**entry, "discover_interval": 2, "scheme": "https"}, "engines[0].")
    assert found is not None and (found.interval, found.url("[fd00::1]:8000")) == (2.0, "https://[fd00::1]:8000")
    assert found.engine_name("10.0.0.7:8000") == "vllm@10.0.0.7:8000"
    assert parse_dns_discovery({"name": "a", "kind": "openai", "url": "http://a:1"}, "engines[0].") is None
    # A DNS server of its own (Consul's DNS interface, a test's): IP, IP:PORT, [IPv6]:PORT.
    for given, wanted in (
        ("10.0.0.10", ("10.0.0.10", 53)),
        ("127.0.0.1:8600", ("127.0.0.1", 8600)),
        ("fd00::a", ("fd00::a", 53)),
        ("[fd00::a]:8600", ("fd00::a", 8600)),
    ):
        found = parse_dns_discovery({**entry, "nameserver": given}, "engines[0].")
        assert found is not None and found.nameserver == wanted, given

    bad: list[tuple[Mapping[str, Any], str]] = [
        ({**entry, "discover": "consul"}, "engines[0].discover: must be dns"),
        ({**entry, "kind": "cpu"}, "engines[0].kind: "),
        ({**entry, "url": "http://x:1"}, "engines[0].url: "),
        ({**entry, "host": "http://vllm"}, "engines[0].host: must be a DNS name"),
        ({**entry, "host": "vllm:8000"}, "engines[0].host: "),
        ({**entry, "port": "8000"}, "engines[0].port: "),
        ({**entry, "port": 70000}, "engines[0].port: "),
        ({**entry, "discover_interval": 0}, "engines[0].discover_interval: "),
        ({**entry, "discover_interval": True}, "engines[0].discover_interval: "),
        ({**entry, "scheme": "ftp"}, "engines[0].scheme: "),
        ({k: v for k, v in entry.items() if k != "name"}, "engines[0].name: is required"),
        ({"name": "a", "kind": "openai", "url": "http://a:1", "host": "a"}, "engines[0].host: only an engine with"),
        ({"name": "a", "kind": "openai", "url": "http://a:1", "nameserver": "10.0.0.1"}, "engines[0].nameserver: only"),
        ({**entry, "nameserver": "dns.local"}, "engines[0].nameserver: must be an IP address"),
        ({**entry, "nameserver": "10.0.0.1:dns"}, "engines[0].nameserver: "),
        ({**entry, "nameserver": "10.0.0.1:70000"}, "engines[0].nameserver: "),
        ({**entry, "nameserver": "[fd00::a]8600"}, "engines[0].nameserver: "),
        ({**entry, "nameserver": 53}, "engines[0].nameserver: "),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            parse_dns_discovery(data, "engines[0].")


async def queries(server: TinyDns, count: int) -> None:
    """Until the server has been asked `count` more times (several discovery intervals)."""
    target = server.queries + count
    async with asyncio.timeout(10):
        while server.queries < target:
            server.asked.clear()
            await server.asked.wait()


def test_engines_follow_the_answer(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server, transport, resolver = await serve()
        changes = Changes()
        watcher = DnsWatcher(DnsDiscovery("vllm", NAME, 8000, interval=0.1), changes, resolver)
        try:
            server.ips = ["10.0.0.1", "10.0.0.2", "fd00::3"]
            watcher.start()
            assert await changes.next() == ({"10.0.0.1:8000", "10.0.0.2:8000", "[fd00::3]:8000"}, set())

            server.ips = ["10.0.0.2", "10.0.0.4", "fd00::3"]  # a pod replaced: scaled, rescheduled
            assert await changes.next() == ({"10.0.0.4:8000"}, {"10.0.0.1:8000"})

            with caplog.at_level(logging.WARNING, logger="gateway.engines.discovery"):
                for mode in ("servfail", "silent"):  # the resolver fails: the last answer stands
                    server.mode = mode
                    await queries(server, 6)
                assert changes.engines == {"10.0.0.2:8000", "10.0.0.4:8000", "[fd00::3]:8000"}
                failures = [r for r in caplog.records if "cannot resolve" in r.message]
                assert len(failures) == 1, "a failing resolver is logged once, not every interval"
                server.mode, server.ips = "answer", ["10.0.0.4"]
                assert await changes.next() == (set(), {"10.0.0.2:8000", "[fd00::3]:8000"})
                assert any("resolves again" in r.message for r in caplog.records)

            server.exists = False  # the Service is gone: NXDOMAIN is an answer, not a failure
            assert await changes.next() == (set(), {"10.0.0.4:8000"})
            server.exists, server.ips = True, ["10.0.0.9"]
            assert await changes.next() == ({"10.0.0.9:8000"}, set())
            assert changes.engines == {"10.0.0.9:8000"} and watcher.addresses == {"10.0.0.9:8000"}
        finally:
            await watcher.stop()
            transport.close()

    asyncio.run(main())


def test_a_plain_callback_and_the_first_answer_signal() -> None:
    async def main() -> None:
        calls: list[tuple[set[str], set[str]]] = []
        server, transport, resolver = await serve()
        server.ips = ["127.0.0.1"]
        watcher = DnsWatcher(DnsDiscovery("e", NAME, 9000, interval=60), lambda a, r: calls.append((a, r)), resolver)
        watcher.start()
        try:
            async with asyncio.timeout(10):
                await watcher.resolved.wait()
            assert calls == [({"127.0.0.1:9000"}, set())]
            await watcher.refresh()  # the same answer: nothing to report
            assert len(calls) == 1
        finally:
            await watcher.stop()
            transport.close()

    asyncio.run(main())


def test_the_pool_and_the_router_follow_the_answer() -> None:
    """Engines come and go in the pool as the name's answer changes, and routing follows: a
    discovered engine gets traffic once healthy and none once gone. Two engines on the loopback
    addresses 127.0.0.1 and ::1, one port, as a headless Service's pods would be."""
    from aiohttp import web

    from gateway.core.metrics import GatewayMetrics
    from gateway.core.request import COMPLETIONS, ApiRequest
    from gateway.dispatch.routing import Router
    from gateway.engines.pool import Pool
    from gateway.settings import parse_settings
    from testkit.procs import free_port

    async def main() -> None:
        server, transport, resolver = await serve()
        app = web.Application()
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
        app.router.add_get("/metrics", lambda r: web.Response(text="engine_num_requests_waiting 0\n"))
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        for host in ("127.0.0.1", "::1"):
            await web.TCPSite(runner, host, port).start()
        engine = {"name": "vllm", "kind": "openai", "discover": "dns", "host": NAME, "port": port}
        settings = parse_settings(
            {
                "engines": [{**engine, "discover_interval": 0.1}],
                "models": [{"name": "m", "routes": [{"engine": "vllm", "model": "m"}]}],
                "health": {"interval": 0.1},
                "auth": {"enabled": False},
            },
            env={},
        )
        pool = Pool(settings.engines, settings.health, GatewayMetrics(), resolver=resolver)
        router = Router(pool, settings.models, settings.routing, random.Random(5))
        request = ApiRequest(COMPLETIONS, "m", {"model": "m", "prompt": "x"})

        async def picked(expected: set[str]) -> None:
            async with asyncio.timeout(10):
                while True:
                    picks = {p.engine.name for _ in range(40) if (p := router.pick(request))}
                    if picks == expected:
                        return
                    await asyncio.sleep(0.05)

        v4, v6 = f"vllm@127.0.0.1:{port}", f"vllm@[::1]:{port}"
        server.ips = ["127.0.0.1"]
        pool.start()
        try:
            await picked({v4})
            server.ips = ["127.0.0.1", "::1"]
            await picked({v4, v6})
            server.ips = ["::1"]
            await picked({v6})
            assert v4 not in pool.engines and pool.members("vllm") == [v6]
        finally:
            await pool.stop()
            await runner.cleanup()
            transport.close()

    asyncio.run(main())
