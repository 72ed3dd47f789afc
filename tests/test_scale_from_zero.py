"""Scale from zero on Kubernetes, simulated with real processes: a gateway whose only engines are
found by DNS (`discover: dns`), a real DNS server on 127.0.0.1 (tests/test_discovery.py's) whose
answer is the engine pods, and this test standing in for KEDA: it reads the gateway's /metrics as
KEDA's Prometheus scaler would (the query and activation threshold of the shipped ScaledObject,
deploy/k8s/base/vllm-scaledobject.yaml) and, once the value crosses the threshold, starts a real
CPU engine and publishes its address, as a Deployment scaled 0 -> 1 behind a headless Service
would. Requests sent while no engine exists are all served; the time from the first request to
the first token is printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from testkit.ci import require
from testkit.poll import eventually
from testkit.procs import TINY_MODEL, Proc, free_port, gateway, worker
from tests.test_discovery import NAME, TinyDns

ROOT = Path(__file__).resolve().parent.parent
SCALED_OBJECT = ROOT / "deploy" / "k8s" / "base" / "vllm-scaledobject.yaml"
MODEL = "llama-3.1-8b-instruct"  # the public model the ScaledObject's query names
REQUESTS = 6
POLL = 0.5  # the stand-in's pollingInterval (the manifest says 15 s: KEDA adds up to that)


class DnsThread:
    """tests/test_discovery.py's TinyDns on a loop of its own, so a real gateway process can ask it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        create = self.loop.create_datagram_endpoint(TinyDns, local_addr=("127.0.0.1", 0))
        self.transport, self.server = asyncio.run_coroutine_threadsafe(create, self.loop).result(10)
        self.port = int(self.transport.get_extra_info("sockname")[1])

    def publish(self, ips: list[str]) -> None:
        self.loop.call_soon_threadsafe(setattr, self.server, "ips", list(ips))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.transport.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def trigger() -> dict[str, Any]:
    scaled = yaml.safe_load(SCALED_OBJECT.read_text())
    assert scaled["spec"]["minReplicaCount"] == 0, "the GPU engines scale from zero"
    backlog = [t for t in scaled["spec"]["triggers"] if t.get("name") == "backlog"]
    assert len(backlog) == 1, "one trigger named backlog"
    return dict(backlog[0]["metadata"])


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def evaluate(query: str, text: str) -> float:
    """The backlog query over one gateway's scrape, as Prometheus would answer it: a sum of terms
    `(sum(METRIC{matchers}) or vector(0))`, optionally `sum(max by (engine) (...))`."""
    terms = re.findall(r"sum\((max by \(engine\) \()?(\w+)(?:\{([^}]*)\})?\)", query)
    assert terms, query
    scraped = samples(text)
    total = 0.0
    for by_engine, name, matchers in terms:
        wanted = re.findall(r'(\w+)(=~|=)"([^"]*)"', matchers)

        def matches(labels: dict[str, str], wanted: list[tuple[str, str, str]] = wanted) -> bool:
            for key, op, value in wanted:
                got = labels.get(key, "")
                if (op == "=" and got != value) or (op == "=~" and not re.fullmatch(value, got)):
                    return False
            return True

        picked = [(labels, v) for n, labels, v in scraped if n == name and matches(labels)]
        if by_engine:
            per_engine: dict[str, float] = {}
            for labels, v in picked:
                per_engine[labels["engine"]] = max(per_engine.get(labels["engine"], 0.0), v)
            total += sum(per_engine.values())
        else:
            total += sum(v for _, v in picked)
    return total


class KedaStandIn(threading.Thread):
    """Polls the gateway's /metrics; when the backlog query's value is above activationThreshold
    (KEDA: `value > activationThreshold`), scales the engines 0 -> 1: a real CPU engine starts and
    its address is published at once (the Service publishes not-ready addresses; the gateway
    health-checks the pod itself)."""

    def __init__(self, gw: Proc, dns: DnsThread, engine: Proc, metadata: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.gw, self.dns, self.engine = gw, dns, engine
        self.query = metadata["query"]
        self.activation = float(metadata.get("activationThreshold", 0))
        self.seen: list[float] = []
        self.activated_at: float | None = None
        self.engine_ready_at: float | None = None  # its /health first answered 200
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.is_set():
                value = evaluate(self.query, client.get(self.gw.url + "/metrics").text)
                self.seen.append(value)
                if value > self.activation and self.activated_at is None:
                    self.activated_at = time.monotonic()
                    self.engine.start()
                    self.dns.publish(["127.0.0.1"])
                if self.activated_at is not None and self.engine_ready_at is None:
                    self._watch_engine(client)
                self.stop_event.wait(POLL)

    def _watch_engine(self, client: httpx.Client) -> None:
        """For the report: when the engine itself first answers /health (its own start time)."""
        while not self.stop_event.is_set():
            try:
                if client.get(self.engine.url + "/health", timeout=1).status_code == 200:
                    self.engine_ready_at = time.monotonic()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)


@pytest.fixture
def dns_server() -> Iterator[DnsThread]:
    server = DnsThread()
    try:
        yield server
    finally:
        server.close()


def config(dns: DnsThread, engine_port: int) -> dict[str, Any]:
    return {
        "health": {"interval": 2.0, "timeout": 2.0},  # as deploy/k8s/base/config.yaml
        "engines": [
            {
                "name": "vllm",
                "kind": "openai",
                "discover": "dns",
                "host": NAME,
                "port": engine_port,
                # Longer than the test: only the hurried resolution (every second) can find the pod.
                "discover_interval": 60,
                "nameserver": f"127.0.0.1:{dns.port}",
                "cold_start_timeout": 120,
            }
        ],
        "models": [{"name": MODEL, "routes": [{"engine": "vllm", "model": "tiny-llama"}]}],
        "auth": {"enabled": False},
    }


async def stream(client: httpx.AsyncClient, url: str, t0: float) -> tuple[int, float | None, int, str]:
    """Status, seconds from t0 to the first token, tokens, and the stream's last data line."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
    first: float | None = None
    tokens, last = 0, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, None, 0, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last != "[DONE]" and any(c.get("delta", {}).get("content") for c in json.loads(last)["choices"]):
                tokens += 1
                first = first or time.monotonic() - t0
    return 200, first, tokens, last


def seen_by_all(gw: Proc, holds: Callable[[dict[str, Any]], bool], timeout: float = 20) -> None:
    """`holds` for ten /ready answers in a row: each lands on one of the two worker processes, so
    both see it."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 10:
        state = ready(gw)
        in_a_row = in_a_row + 1 if holds(state) else 0
        assert time.monotonic() < deadline, f"{state}\n{gw.log_tail()}"
        time.sleep(0.1)


def ready(gw: Proc) -> dict[str, Any]:
    r = httpx.get(gw.url + "/ready", timeout=10)
    return {"status": r.status_code, **r.json()}


def test_requests_wait_for_the_first_engine_and_are_all_served(logs_dir: Path, dns_server: DnsThread) -> None:
    require((TINY_MODEL / "config.json").exists(), f"tiny model missing at {TINY_MODEL}")
    engine_port = free_port()
    engine = worker(logs_dir, "--model", str(TINY_MODEL), name="pod-0", port=engine_port)
    gw = gateway(logs_dir, config(dns_server, engine_port), name="from-zero", workers=2).start()
    keda = KedaStandIn(gw, dns_server, engine, trigger())
    try:
        gw.wait_healthy("/ready", timeout=60)
        # Zero engines: the model is cold, and cold is ready (the gateway stays in its Service).
        state = ready(gw)
        assert state["status"] == 200 and state["model_states"] == {MODEL: "cold"}, state
        assert state["engines"] == {}
        keda.start()
        time.sleep(2 * POLL)
        assert keda.seen and max(keda.seen) == 0 and keda.activated_at is None, "nothing waits: no scale-up"

        async def burst() -> tuple[float, list[tuple[int, float | None, int, str]]]:
            async with httpx.AsyncClient(timeout=180) as client:
                t0 = time.monotonic()
                return t0, await asyncio.gather(*(stream(client, gw.url, t0) for _ in range(REQUESTS)))

        t0, results = asyncio.run(burst())
        failed = [r for r in results if r[0] != 200 or r[3] != "[DONE]" or r[2] == 0]
        assert not failed, f"{failed}\n{gw.log_tail()}"
        assert keda.activated_at is not None
        assert max(keda.seen) >= 1, "the waiting requests showed in the backlog query"
        firsts = sorted(r[1] for r in results if r[1] is not None)
        assert len(firsts) == REQUESTS
        assert keda.engine_ready_at is not None
        print(
            f"\nscale from zero: {REQUESTS} streams sent with no engine. The stand-in KEDA saw a backlog of "
            f"{max(keda.seen):g} {keda.activated_at - t0:.2f} s after the first request (polling every {POLL} s) "
            f"and started the engine; the engine answered /health {keda.engine_ready_at - t0:.2f} s after the "
            f"first request; first token {firsts[0]:.2f} s after it (the last stream's: {firsts[-1]:.2f} s), "
            f"so the gateway served {firsts[0] - (keda.engine_ready_at - t0):.2f} s after the engine was up"
        )
        # Each worker process discovers engines on its own: one that had no request waiting
        # finds the pod at its next discover_interval (a request that waits there hurries it),
        # so the workers that served say ready; /ready lands on either.
        state = eventually(lambda: ready(gw), lambda s: s["model_states"] == {MODEL: "ready"}, timeout=20)
        assert state["engines"], state
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        waiting = [v for n, labels, v in samples(metrics) if n == "gateway_cold_waiting_requests"]
        assert waiting and sum(waiting) == 0, "nobody waits any more"
        waited = [v for n, labels, v in samples(metrics) if n == "gateway_cold_start_wait_seconds_count"]
        assert sum(waited) == REQUESTS

        # KEDA scales back to zero after its cooldown: the address goes, the pod stops. The model
        # is cold again (not down) long before the 60 s discover_interval.
        dns_server.publish([])
        engine.stop()
        seen_by_all(
            gw,
            lambda state: state["status"] == 200 and state["model_states"] == {MODEL: "cold"} and not state["engines"],
        )
    finally:
        keda.stop_event.set()
        if keda.is_alive():
            keda.join(10)
        gw.stop()
        engine.stop()
