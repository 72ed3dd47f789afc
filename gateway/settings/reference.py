"""The configuration reference: every config key with its default and meaning, from the settings dataclasses.

    python -m gateway.settings.reference            # print the Markdown table
    python -m gateway.settings.reference --write    # refresh it in README.md

A key's default is its dataclass field's default; its meaning is the comment on the field's line,
or DESCRIPTIONS below when the field has none. tests/test_config_reference.py checks that the
README holds exactly this table and that it names exactly the keys the parser accepts, so a new
setting cannot go undocumented.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from gateway.settings.batch import BatchSettings, FilesSettings
from gateway.settings.engines import EngineSettings, VllmSettings
from gateway.settings.inference_log import InferenceLogSettings, PayloadCapture
from gateway.settings.models import ModelSettings, RouteSettings
from gateway.settings.scheduler import SchedulerSettings
from gateway.settings.sections import AuthSettings, HealthSettings, RedisSettings, RoutingSettings
from gateway.settings.server import ServerSettings, TlsSettings
from gateway.settings.store import StoreSettings

START = "<!-- config-reference:start (python -m gateway.settings.reference --write) -->"
END = "<!-- config-reference:end -->"

# (key prefix, dataclass, fields that are not keys, keys that are not fields: key -> description)
SECTIONS: list[tuple[str, type, tuple[str, ...], dict[str, str]]] = [
    ("server.", ServerSettings, ("tls",), {"tls": "`{cert, key}`: serve HTTPS on both listeners"}),
    ("server.tls.", TlsSettings, (), {}),
    ("health.", HealthSettings, (), {}),
    (
        "routing.",
        RoutingSettings,
        (),
        {"strategy": "older spelling of `plugins`: `least_loaded` or `prefix_affinity` (+ `least_loaded`)"},
    ),
    ("redis.", RedisSettings, (), {}),
    ("auth.", AuthSettings, (), {}),
    ("scheduler.", SchedulerSettings, (), {}),
    ("store.", StoreSettings, (), {}),
    ("inference_log.", InferenceLogSettings, (), {}),
    ("files.", FilesSettings, (), {}),
    ("batch.", BatchSettings, (), {}),
    (
        "engines[].",
        EngineSettings,
        ("api_key", "vllm", "discovery"),
        {
            "api_key_env": "the environment variable holding a bearer token sent to the engine",
            "vllm": "vLLM engine arguments (kind `vllm` only), below",
            "discover": "`dns`: one engine per address that `host` resolves to, at `port` (kind `openai`)",
            "host": "`discover: dns`: the DNS name (a Kubernetes headless Service)",
            "discover_interval": "`discover: dns`: seconds between resolutions (default `10`)",
            "scheme": "`discover: dns`: `http` (default) or `https`",
        },
    ),
    ("engines[].vllm.", VllmSettings, (), {}),
    (
        "models[].",
        ModelSettings,
        ("routes", "log_payloads"),
        {
            "routes": "the model's routes (versions), below",
            "log_payloads": "sampled payload capture in the inference log (off unless given), below",
        },
    ),
    ("models[].log_payloads.", PayloadCapture, (), {}),
    (
        "models[].routes[].",
        RouteSettings,
        (),
        {"engine": "one engine: short for `engines: [NAME]`"},
    ),
]

DEFAULTS = {  # where the dataclass default does not say it
    "engines[].url": "required for `openai`",
    "engines[].served_model_name": "the model directory's name",
    "engines[].apis": "all of them for `vllm`; none for `cpu` and `openai`",
    "models[].routes[].model": "the first engine's `served_model_name`",
    "models[].routes[].name": "`v1`, `v2`, ... by position",
}

DESCRIPTIONS = {  # where the field's own comment is missing or says why rather than what
    "server.host": "the public listener's address (`--host`)",
    "server.port": "the public listener's port (`--port`)",
    "server.workers": "worker processes serving requests (`--workers`); engines are started once",
    "server.max_body_bytes": "a request body larger than this gets 413",
    "health.interval": "seconds between health checks of each engine",
    "health.timeout": "seconds a health check may take",
    "routing.plugins": "engine-choice plugins in order: `least_loaded`, `prefix_affinity`, `kv_cache`",
    "routing.prefix_chars": "prefix_affinity: how much of the prompt's start is hashed",
    "routing.max_imbalance": "prefix_affinity: how much busier than the least-loaded engine the sticky one may be",
    "redis.url": "Redis for keys, quotas and routes (`GATEWAY_REDIS_URL` overrides); unset: no keys",
    "redis.timeout": "seconds any Redis call may take",
    "redis.prefix": "prefix of every Redis key",
    "auth.enabled": "require API keys (needs Redis); `configs/default.yaml` turns it off",
    "auth.admin_key": "not read from the file: set the environment variable `GATEWAY_ADMIN_KEY`",
    "auth.admin_is_client": "the admin key may also call the OpenAI API",
    "auth.lease_ttl": "seconds a concurrency slot lives unless refreshed (a crashed gateway leaks nothing)",
    "health.failures_to_eject": "failed health checks in a row that take an engine out of rotation",
    "engines[].name": "the engine's name in routes, metrics and logs",
    "engines[].apis": "the APIs it serves itself, of `responses`, `messages`, `tokenize`, `rerank`, `score`, `audio`; Responses and Messages are translated to chat completions for the others",
    "engines[].kind": "`cpu` or `vllm` (managed: the gateway starts and stops it) or `openai` (reached at `url`)",
    "engines[].url": "`openai` engines: an `http://` or `https://` address",
    "engines[].model": "managed engines: the model directory, or `all-MiniLM-L6-v2` (required for them)",
    "engines[].served_model_name": "the model name the engine answers to",
    "engines[].port": "managed engines: the port it listens on, on 127.0.0.1; `discover: dns`: the engines' port",
    "engines[].vllm.startup_timeout": "seconds a vLLM engine may take to answer /health before it is restarted",
    "engines[].args": "extra command-line arguments of a managed engine",
    "engines[].env": "extra environment variables of a managed engine",
    "engines[].health_path": "the engine's health endpoint",
    "engines[].metrics_path": "the engine's Prometheus endpoint, read for its load (null: none)",
    "engines[].max_restarts_per_minute": "a managed engine that dies more often is paused (crash loop)",
    "engines[].vllm.max_model_len": "vLLM `--max-model-len`",
    "engines[].vllm.tensor_parallel_size": "vLLM `--tensor-parallel-size`",
    "engines[].vllm.pipeline_parallel_size": "vLLM `--pipeline-parallel-size`",
    "engines[].vllm.gpu_memory_utilization": "vLLM `--gpu-memory-utilization`, in (0, 1]",
    "engines[].vllm.enable_prefix_caching": "vLLM `--enable-prefix-caching`",
    "engines[].vllm.enforce_eager": "vLLM `--enforce-eager`",
    "engines[].vllm.max_num_seqs": "vLLM `--max-num-seqs`",
    "models[].name": "the public model name clients send",
    "models[].routes[].engines": "the engines of this route (required: `engines` or `engine`)",
    "models[].routes[].weight": "the share of traffic among the model's routes (0 = none)",
    "engines[].max_inflight": "requests the engine runs at once (split between workers); unset: learned",
    "scheduler.enabled": "queue requests in the gateway when every engine of a model is full (false: FCFS)",
    "scheduler.max_queue_wait": "seconds a request may wait for an engine slot (then 429 `queue_timeout`)",
    "scheduler.max_queued_per_key": "requests one key may have waiting (the next gets 429 `queue_full`)",
    "scheduler.learn_capacity": "learn an engine's capacity from its running/waiting figures when unset",
    "store.url": "`sqlite:///PATH` (under `data_dir`) or `postgresql://...` (`GATEWAY_STORE_URL` overrides)",
    "store.data_dir": "where a relative SQLite path lives (relative to the project root)",
    "inference_log.enabled": "one row per request in the store, written in the background",
    "inference_log.flush_interval": "seconds between writes (sooner once `flush_rows` rows wait)",
    "inference_log.flush_rows": "rows that trigger a write",
    "inference_log.buffer_size": "rows held while the store is slow; past this, rows are dropped and counted",
    "inference_log.retention_days": "older rows are deleted hourly; 0 keeps them",
    "files.max_bytes": "largest upload (413 beyond)",
    "files.purge_after": "seconds after which an upload cut short (a crash) is removed",
    "files.purge_interval": "seconds between purges of uploads cut short",
    "batch.max_lines": "lines per input file (a validation error beyond)",
    "batch.concurrency": "batch lines in flight per gateway process; 0: this process runs none",
    "batch.max_batches": "batches one process runs at once (they share `concurrency`)",
    "batch.claim_size": "lines claimed from the store in one step",
    "batch.lease_ttl": "seconds after which a dead runner's batch is taken over",
    "batch.claim_ttl": "seconds after which a dead runner's claimed lines run again",
    "batch.poll_interval": "seconds between an idle process's looks for work",
    "batch.cancel_grace": "seconds a cancelled batch waits for its lines in flight",
    "batch.min_completion_window": "the shortest `completion_window` accepted, in seconds (OpenAI: only 24h)",
    "models[].log_payloads.sample": "share of requests whose bodies are kept with their row (0 to 1)",
    "models[].log_payloads.redact": "JSON keys to blank at any depth, or `re:REGEX` for matches in strings",
    "models[].log_payloads.max_bytes": "most bytes kept of each body",
}


def _comments(cls: type) -> dict[str, str]:
    """The trailing comment of each field's line in the class's source."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if dataclasses.is_dataclass(value):
        return "see below"
    return f"`{value}`"


def rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every config key."""
    table = []
    for prefix, cls, hidden, extra in SECTIONS:
        comments = _comments(cls)
        for field in dataclasses.fields(cls):
            if field.name in hidden:
                continue
            key = prefix + field.name
            meaning = DESCRIPTIONS.get(key) or comments.get(field.name, "")
            table.append((key, DEFAULTS.get(key) or _default(field), meaning))
        for name, meaning in extra.items():
            table.append((prefix + name, "unset", meaning))
    return table


def markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {default} | {meaning.replace('|', '/')} |" for key, default, meaning in rows()]
    return "\n".join(lines)


def in_readme(text: str) -> str | None:
    """The table between the README's markers, or None when they are missing."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write(readme: Path) -> None:
    text = readme.read_text()
    if in_readme(text) is None:
        raise SystemExit(f"{readme}: the markers {START} ... {END} are missing")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(f"{before}{START}\n{markdown()}\n{END}{after}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write(Path(__file__).resolve().parents[2] / "README.md")
    else:
        print(markdown())
