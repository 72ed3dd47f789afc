"""The `adapters:` and `cache:` sections, adapter name and path checks, the LoRA flags of managed
vLLM engines, and the two answer shapes of the response cache (pure functions, no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.cache.near import Entry, NearCache
from gateway.cache.shapes import fold_stream, unfold
from gateway.engines.vllm_launch import vllm_command, vllm_env
from gateway.settings import ConfigError, check_path, parse_settings


def settings(tmp_path: Path, **extra: Any) -> Any:
    base: dict[str, Any] = {
        "auth": {"enabled": False},
        "engines": [{"name": "v", "kind": "vllm", "model": "/m/llama", "port": 9100}],
        "models": [{"name": "llama", "routes": [{"engine": "v"}]}],
    }
    return parse_settings({**base, **extra}, "t.yaml")


def test_adapters_turn_lora_on_for_managed_vllm(tmp_path: Path) -> None:
    off = settings(tmp_path)
    assert off.adapters is None and "--enable-lora" not in vllm_command(off.engines[0], "python")
    on = settings(
        tmp_path,
        adapters={
            "directories": [str(tmp_path)],
            "models": [{"name": "a", "base": "llama", "path": str(tmp_path / "a")}],
        },
    )
    cmd = vllm_command(on.engines[0], "python")
    assert cmd[cmd.index("--enable-lora") + 1 :][:2] == ["--max-loras", "1"]
    # vLLM serves the load and unload endpoints only with this in its environment
    assert vllm_env(on.engines[0], "/c")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_env(off.engines[0], "/c")
    assert on.adapters.models[0].name == "a"


@pytest.mark.parametrize(
    ("adapter", "problem"),
    [
        ({"name": "../x", "base": "llama", "path": "/d/x"}, "name"),
        ({"name": "llama", "base": "llama", "path": "/d/x"}, "already a model"),
        ({"name": "a", "base": "nope", "path": "/d/x"}, "base"),
        ({"name": "a", "base": "llama", "path": "/etc/passwd"}, "outside adapters.directories"),
        ({"name": "a", "base": "llama", "path": "s3://b/x"}, "adapters.uris"),
    ],
)
def test_bad_adapters_are_config_errors(tmp_path: Path, adapter: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=r"adapters\.models"):
        try:
            settings(tmp_path, adapters={"directories": ["/d"], "models": [adapter]})
        except ConfigError as exc:
            assert problem in str(exc), exc
            raise


def test_paths_and_uris(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "out").symlink_to("/etc")
    dirs, uris = (str(tmp_path),), ("s3://bucket/adapters/",)
    assert check_path(str(tmp_path / "ok"), dirs, uris) is None
    assert check_path(str(tmp_path / "new"), dirs, uris) is None  # the engine's disk may differ
    for bad in [
        str(tmp_path / "out" / "passwd"),
        str(tmp_path / ".." / "x"),
        str(tmp_path) + "-sibling/x",
        "relative/x",
        "",
        "s3://bucket/adapters/../x",
        "s3://bucket/other/x",
        "s3://key:secret@bucket/adapters/x",
        "s3://bucket/adapters/x?y=1",
        "http://127.0.0.1/adapters/x",
        "/d/x\n",
        "x" * 2000,
    ]:
        assert check_path(bad, dirs, uris) is not None, bad


def test_cache_section_bounds(tmp_path: Path) -> None:
    assert settings(tmp_path).cache.enabled is False
    for bad in ({"ttl": 0}, {"charge": 2}, {"max_memory": 10}, {"local_memory": -1}, {"shared": "x"}, {"nope": 1}):
        with pytest.raises(ConfigError, match="cache"):
            settings(tmp_path, cache=bad)


def test_a_whole_answer_replays_as_a_stream_and_a_stream_folds_back() -> None:
    whole = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    sse = unfold(whole, chat=True, with_usage=True)
    assert sse is not None and sse.endswith(b"data: [DONE]\n\n") and b'"usage"' in sse
    folded = fold_stream(sse, chat=True, usage=whole["usage"])
    assert folded is not None
    back = json.loads(folded)
    assert back["choices"][0]["message"]["content"] == "hi there" and back["choices"][0]["finish_reason"] == "stop"
    assert back["usage"] == whole["usage"]
    tools = {
        **whole,
        "choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [{}]}, "finish_reason": "tool_calls"}],
    }
    assert unfold(tools, chat=True, with_usage=False) is None  # not replayable as a stream
    unfinished = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    assert fold_stream(unfinished, chat=True, usage=None) is None
    text = b'data: {"id":"x","choices":[{"index":0,"text":"ab","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    assert json.loads(fold_stream(text, chat=False, usage=None) or b"")["choices"][0]["text"] == "ab"


def test_the_process_copy_is_bounded_expires_and_forgets_a_model() -> None:
    body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}]}'
    near = NearCache(3 * (len(body) + 200))
    size = near.max_bytes // 3
    for i in range(4):
        near.put(f"d{i}", "m" if i % 2 else "n", body, 100.0)
    assert len(near) == 3 and near.bytes == 3 * size and near.get("d0", 1.0) is None  # least recent out
    first = near.get("d1", 1.0)  # used: now the most recent, and an Entry from now on
    assert first is not None and first is near.get("d1", 2.0) and first.body == body
    near.put("d4", "n", body, 100.0)
    assert near.get("d2", 1.0) is None and near.get("d1", 1.0) is not None
    assert near.get("d3", 100.0) is None and len(near) == 2  # expired: gone
    near.drop_model("m")
    assert near.get("d1", 1.0) is None and near.get("d4", 1.0) is not None and near.bytes == size
    near.put("big", "m", body * 10, 100.0)  # larger than the bound: not kept
    assert near.get("big", 1.0) is None
    near.drop_model(None)
    assert len(near) == 0 and near.bytes == 0
    entry = Entry("m", body, 100.0)
    entry.parse()
    assert entry.finish == "stop" and entry.usage is None
    streamed = entry.stream(chat=True, with_usage=False)
    assert streamed is not None and streamed is entry.stream(chat=True, with_usage=False)  # built once
