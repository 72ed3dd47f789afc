"""LoRA adapters on the CPU engine, as vLLM serves them: real engine processes, the bundled
adapter of the tiny model (engines/tiny_model/adapters/python-code), greedy decoding."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from testkit.ci import require
from testkit.metrics import metric
from testkit.poll import eventually
from testkit.procs import ROOT, TINY_MODEL, Proc, worker

MODEL = "tiny-llama"
ADAPTER = ROOT / "engines" / "tiny_model" / "adapters" / "python-code"
PROMPT = "The license"
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(ADAPTER, root / "second")
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["nope_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (root / "escape").symlink_to(ADAPTER.parent)  # inside the directory by name, outside in truth
    return root


@pytest.fixture(scope="module")
def lora_worker(logs_dir: Path, lora_dir: Path) -> Iterator[Proc]:
    require(importlib.util.find_spec("peft") is not None, "peft is not installed (the engine extra has it)")
    proc = worker(
        logs_dir,
        "--model",
        str(TINY_MODEL),
        "--num-blocks",
        str(NUM_BLOCKS),
        "--enable-lora",
        "--max-loras",
        "1",
        "--lora-dir",
        str(lora_dir),
        "--lora-modules",
        f"code={ADAPTER}",
        name="lora",
    ).start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def complete(proc: Proc, model: str, prompt: str = PROMPT, max_tokens: int = 16) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(proc.url + "/v1/completions", json=body, timeout=120)


def text_of(proc: Proc, model: str, prompt: str = PROMPT) -> str:
    r = complete(proc, model, prompt)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return str(r.json()["choices"][0]["text"])


def load(proc: Proc, body: object, raw: bytes | None = None) -> httpx.Response:
    url = proc.url + "/v1/load_lora_adapter"
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=120)
    return httpx.post(url, json=body, timeout=120)


def unload(proc: Proc, name: object) -> httpx.Response:
    return httpx.post(proc.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def kv_total(proc: Proc) -> float:
    return metric(httpx.get(proc.url + "/metrics").text, "engine_kv_blocks_total")


def vllm_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and error["code"] == status and error["param"] is None, error
    return str(error["message"])


def test_models_lists_the_adapter_with_its_parent(lora_worker: Proc) -> None:
    cards = {c["id"]: c for c in httpx.get(lora_worker.url + "/v1/models").json()["data"]}
    assert cards["code"]["parent"] == MODEL
    assert cards["code"]["root"] == str(ADAPTER)
    assert "parent" not in cards[MODEL]


def test_the_adapter_answers_differently_from_the_base(lora_worker: Proc) -> None:
    base, adapted = text_of(lora_worker, MODEL), text_of(lora_worker, "code")
    assert base != adapted
    assert text_of(lora_worker, "code") == adapted  # greedy: the same answer again
    client = openai.OpenAI(base_url=lora_worker.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Write a function."}]
    chats = {
        m: client.chat.completions.create(model=m, messages=messages, temperature=0, max_tokens=12)  # type: ignore[arg-type]
        for m in (MODEL, "code")
    }
    assert chats["code"].model == "code"
    assert chats["code"].choices[0].message.content != chats[MODEL].choices[0].message.content


def test_streaming_with_an_adapter(lora_worker: Proc) -> None:
    whole = text_of(lora_worker, "code")
    client = openai.OpenAI(base_url=lora_worker.url + "/v1", api_key="none")
    stream = client.completions.create(
        model="code", prompt=PROMPT, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"code"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_load_unload_and_max_loras(lora_worker: Proc, lora_dir: Path) -> None:
    adapted = text_of(lora_worker, "code")
    # the base and its one resident adapter (the figures follow the engine's loop: polled)
    eventually(lambda: kv_total(lora_worker), lambda v: v == 2 * NUM_BLOCKS, timeout=10, what="kv blocks")
    r = load(lora_worker, {"lora_name": "second", "lora_path": str(lora_dir / "second")})
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'second' added successfully."
    # One more than max_loras: registered like vLLM does, the least recently used one evicted.
    eventually(lambda: kv_total(lora_worker), lambda v: v == 2 * NUM_BLOCKS, timeout=10, what="kv blocks")
    names = {c["id"] for c in httpx.get(lora_worker.url + "/v1/models").json()["data"]}
    assert names == {MODEL, "code", "second"}
    assert text_of(lora_worker, "second") == adapted  # the same weights under another name
    started = time.monotonic()
    assert text_of(lora_worker, "code") == adapted  # loaded again on demand, evicting "second"
    print(f"an evicted adapter answered in {time.monotonic() - started:.2f}s (loaded again)")
    eventually(lambda: kv_total(lora_worker), lambda v: v == 2 * NUM_BLOCKS, timeout=10, what="kv blocks")

    again = load(lora_worker, {"lora_name": "second", "lora_path": str(lora_dir / "second")})
    assert "already been loaded" in vllm_error(again, 400, "InvalidUserInput")
    inplace = {"lora_name": "second", "lora_path": str(lora_dir / "second"), "load_inplace": True}
    assert load(lora_worker, inplace).status_code == 200

    r = unload(lora_worker, "second")
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'second' removed successfully."
    assert "cannot be found" in vllm_error(unload(lora_worker, "second"), 404, "NotFoundError")
    gone = complete(lora_worker, "second")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert httpx.get(lora_worker.url + "/health").status_code == 200


HUGE = "x" * 200_000


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        ({"lora_name": "t", "lora_path": "/etc"}, 400, "InvalidUserInput", "outside"),
        ({"lora_name": "t", "lora_path": "{dir}/../../../etc"}, 400, "InvalidUserInput", "outside"),
        ({"lora_name": "t", "lora_path": "{dir}/escape/python-code"}, 400, "InvalidUserInput", "outside"),
        ({"lora_name": "t", "lora_path": "{dir}/sec\u0000ond"}, 400, "InvalidUserInput", "not a valid path"),
        ({"lora_name": "t", "lora_path": "https://example.com/adapter"}, 400, "InvalidUserInput", "never fetched"),
        ({"lora_name": "t", "lora_path": "{dir}/" + "y" * 5000}, 400, "InvalidUserInput", "not a valid path"),
        ({"lora_name": "t", "lora_path": "{dir}/" + "y" * 300}, 404, "NotFoundError", "No adapter found"),
        ({"lora_name": "t", "lora_path": "{dir}/missing"}, 404, "NotFoundError", "No adapter found"),
        ({"lora_name": "t", "lora_path": "{dir}/broken"}, 400, "BadRequestError", "could not be loaded"),
        ({"lora_name": HUGE[:5000], "lora_path": "{dir}/second"}, 400, "InvalidUserInput", "longer than"),
        ({"lora_name": "a\u0000b", "lora_path": "{dir}/second"}, 400, "InvalidUserInput", "control characters"),
        ({"lora_name": MODEL, "lora_path": "{dir}/second"}, 400, "InvalidUserInput", "conflicts with a served base"),
        ({"lora_name": 7, "lora_path": "{dir}/second"}, 400, "InvalidUserInput", "non-empty string"),
        ({"lora_name": "t"}, 400, "InvalidUserInput", "must be provided"),
        ({"lora_name": "t", "lora_path": ["{dir}"]}, 400, "InvalidUserInput", "must be provided"),
        ({"lora_name": "t", "lora_path": "{dir}/second", "load_inplace": "yes"}, 400, "BadRequestError", "boolean"),
        ([1, 2], 400, "BadRequestError", "JSON object"),
        ({"lora_name": "t", "lora_path": HUGE}, 413, "InvalidUserInput", "larger than"),
    ],
)
def test_hostile_loads_are_refused_with_4xx(
    lora_worker: Proc, lora_dir: Path, body: object, status: int, kind: str, says: str
) -> None:
    raw = json.dumps(body).replace("{dir}", str(lora_dir)).encode()
    r = load(lora_worker, None, raw=raw)
    assert says in vllm_error(r, status, kind)
    names = {c["id"] for c in httpx.get(lora_worker.url + "/v1/models").json()["data"]}
    assert "t" not in names


def test_hostile_unloads_and_bodies(lora_worker: Proc) -> None:
    for name in ("", None, 5, HUGE[:5000], "never-loaded", "a\u0000b"):
        r = unload(lora_worker, name)
        assert r.status_code in (400, 404), r.text
        assert r.json()["error"]["code"] == r.status_code
    r = httpx.post(lora_worker.url + "/v1/load_lora_adapter", content=b"{not json", timeout=10)
    assert "not valid JSON" in vllm_error(r, 400, "BadRequestError")
    r = httpx.post(lora_worker.url + "/v1/load_lora_adapter", content=b"\xff\xfe", timeout=10)
    vllm_error(r, 400, "BadRequestError")
    assert httpx.get(lora_worker.url + "/health").status_code == 200


def test_without_enable_lora_the_routes_are_not_there(tiny_worker: Proc) -> None:
    r = httpx.post(tiny_worker.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
    vllm_error(r, 404, "NotFoundError")
    r = httpx.post(tiny_worker.url + "/v1/unload_lora_adapter", json={"lora_name": "a"})
    vllm_error(r, 404, "NotFoundError")
    assert complete(tiny_worker, "code").status_code == 404
