"""The `engines:` section: managed engines (cpu, vllm) the gateway starts, and external ones."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.settings.discovery import DISCOVERY_KEYS, DnsDiscovery, parse_dns_discovery
from gateway.settings.reader import ConfigError, Reader, dataclass_fields

ENGINE_KINDS = ("cpu", "openai", "vllm")
MANAGED_KINDS = ("cpu", "vllm")
# The APIs beyond chat, completions and embeddings that an engine may serve itself (`apis:`).
# Responses and Messages are translated to chat completions for an engine that does not; the
# others (tokenize, rerank, score, audio) reach only engines that serve them.
ENGINE_APIS = ("responses", "messages", "tokenize", "rerank", "score", "audio")
# vLLM (0.32) serves them all (/v1/responses, /v1/messages, /tokenize, /v1/rerank, /v1/score,
# /v1/audio/*); our CPU engine none of them.
DEFAULT_APIS = {"vllm": frozenset(ENGINE_APIS), "cpu": frozenset(), "openai": frozenset()}


@dataclass(frozen=True)
class VllmSettings:
    """vLLM engine arguments, turned into `vllm serve` flags by gateway/engines/vllm_launch.py."""

    dtype: str | None = None  # auto, float16, bfloat16, float32 (float32 on AVX2 CPUs)
    max_model_len: int | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None
    kv_cache_space_gib: float | None = None  # CPU builds only: VLLM_CPU_KVCACHE_SPACE
    startup_timeout: float = 300.0  # vLLM compiles at start: a minute or more on CPU


@dataclass(frozen=True)
class EngineSettings:
    name: str
    kind: str
    url: str  # where the gateway reaches it; for managed engines http://127.0.0.1:{port}
    model: str | None = None  # managed: the model path (or all-MiniLM-L6-v2)
    served_model_name: str | None = None
    port: int | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python: str | None = None  # managed: the interpreter (a vLLM venv has its own)
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    api_key: str | None = None  # sent upstream as a bearer token (external engines)
    max_restarts_per_minute: int = 10
    # requests the gateway keeps in flight there at most (split between its worker processes);
    # None: learned from the engine's own running/waiting figures (gateway/dispatch/capacity.py)
    max_inflight: int | None = None
    max_loras: int | None = None  # LoRA adapters held at once (--max-loras); 1 with `adapters:`
    vllm: VllmSettings = field(default_factory=VllmSettings)
    discovery: DnsDiscovery | None = None  # `discover: dns`: one engine per address of a name
    idle_stop: float | None = None  # managed: stop after this many seconds without traffic (scale to zero)
    cold_start_timeout: float | None = None  # request wait for a stopped or scaled-to-zero engine (default: startup)
    ca_file: str | None = None  # https:// engines: verify the engine's certificate against this CA bundle
    apis: frozenset[str] = frozenset()  # of ENGINE_APIS: what it serves itself (default by kind)

    @property
    def managed(self) -> bool:
        return self.kind in MANAGED_KINDS

    @property
    def startup_timeout(self) -> float:
        """How long a managed engine may take to answer /health before it is restarted."""
        return self.vllm.startup_timeout if self.kind == "vllm" else 120.0

    @property
    def wake_timeout(self) -> float:
        """How long a request waits for this engine to start from stopped (then 503)."""
        return self.cold_start_timeout if self.cold_start_timeout is not None else self.startup_timeout


_ENGINE_KEYS = (
    "name",
    "kind",
    "url",
    "model",
    "served_model_name",
    "port",
    "args",
    "env",
    "python",
    "health_path",
    "metrics_path",
    "api_key_env",
    "max_restarts_per_minute",
    "max_inflight",
    "max_loras",
    "vllm",
    *DISCOVERY_KEYS,
    "idle_stop",
    "cold_start_timeout",
    "ca_file",
    "apis",
)


def parse_engine(r: Reader, index: int, data: Any, base_dir: Path, env: Mapping[str, str]) -> EngineSettings:
    path = f"engines[{index}]."
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, _ENGINE_KEYS)
    name = r.get(data, "name", path, str, None)
    if not name:
        raise r.fail(f"{path}name", "is required")
    kind = r.get(data, "kind", path, str, None)
    if kind not in ENGINE_KINDS:
        raise r.fail(f"{path}kind", f"must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    args = data.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise r.fail(f"{path}args", "must be a list of strings")
    env_vars = data.get("env") or {}
    if not isinstance(env_vars, Mapping):
        raise r.fail(f"{path}env", "must be a mapping of names to strings")
    api_key_env = r.get(data, "api_key_env", path, str, None)
    common: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "args": tuple(str(a) for a in args),
        "env": {str(k): str(v) for k, v in env_vars.items()},
        "health_path": r.get(data, "health_path", path, str, "/health"),
        "metrics_path": data.get("metrics_path", "/metrics") or None,
        "api_key": env.get(api_key_env) if api_key_env else None,
        "served_model_name": r.get(data, "served_model_name", path, str, None),
        "max_restarts_per_minute": r.get(data, "max_restarts_per_minute", path, int, 10, 1),
        "max_inflight": r.get(data, "max_inflight", path, int, None, 1),
        "apis": _apis(r, data, path, kind),
        "max_loras": r.get(data, "max_loras", path, int, None, 1, 1024),
        **_operations(r, data, path, kind, base_dir),
    }
    if "vllm" in data:
        if kind != "vllm":
            raise r.fail(f"{path}vllm", "only engines of kind vllm take vllm arguments")
        common["vllm"] = _vllm(r, data["vllm"], f"{path}vllm.")
    try:
        discovery = parse_dns_discovery(data, path)
    except ValueError as exc:
        raise ConfigError(f"{r.source}: {exc}") from None
    if discovery is not None:
        url = f"{discovery.scheme}://{discovery.host}:{discovery.port}"
        return EngineSettings(url=url, discovery=discovery, **common)
    if kind == "openai":
        url = r.get(data, "url", path, str, None)
        if not url or not url.startswith(("http://", "https://")):
            raise r.fail(f"{path}url", "is required for kind openai and must start with http:// or https://")
        return EngineSettings(url=url.rstrip("/"), **common)
    port = r.get(data, "port", path, int, None, 1, 65535)
    if port is None:
        raise r.fail(f"{path}port", "is required for a managed engine (1-65535)")
    model = r.get(data, "model", path, str, None)
    if not model:
        raise r.fail(f"{path}model", "is required for a managed engine")
    model = resolve_path(model, base_dir) or model
    python = resolve_path(r.get(data, "python", path, str, None), base_dir)
    if common["served_model_name"] is None:
        common["served_model_name"] = Path(model).name
    return EngineSettings(url=f"http://127.0.0.1:{port}", model=model, port=port, python=python, **common)


def _operations(r: Reader, data: Mapping[str, Any], path: str, kind: str, base_dir: Path) -> dict[str, Any]:
    """Scale to zero (managed engines) and TLS verification (https:// engines)."""
    values = {
        "idle_stop": r.get(data, "idle_stop", path, float, None, 0.1),
        "cold_start_timeout": r.get(data, "cold_start_timeout", path, float, None, 0.1),
        "ca_file": resolve_path(r.get(data, "ca_file", path, str, None), base_dir),
    }
    if values["idle_stop"] is not None and kind not in MANAGED_KINDS:
        raise r.fail(f"{path}idle_stop", "only managed engines (cpu, vllm) can be stopped when idle")
    if values["ca_file"] is not None:
        if not str(data.get("url", "")).startswith("https://"):
            raise r.fail(f"{path}ca_file", "only an engine with an https:// url is verified against a CA file")
        if not Path(values["ca_file"]).is_file():
            raise r.fail(f"{path}ca_file", f"no such file: {values['ca_file']}")
    return values


def resolve_path(path: str | None, base_dir: Path) -> str | None:
    if path and not Path(path).is_absolute() and (base_dir / path).exists():
        # abspath, not resolve(): a venv's python is a symlink that must stay one.
        return os.path.abspath(base_dir / path)
    return path


def _vllm(r: Reader, data: Any, path: str) -> VllmSettings:
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, dataclass_fields(VllmSettings))
    kinds: dict[str, type] = {
        "dtype": str,
        "max_model_len": int,
        "tensor_parallel_size": int,
        "pipeline_parallel_size": int,
        "gpu_memory_utilization": float,
        "enable_prefix_caching": bool,
        "enforce_eager": bool,
        "max_num_seqs": int,
        "kv_cache_space_gib": float,
        "startup_timeout": float,
    }
    values = {k: r.get(data, k, path, kind, None, 0 if kind in (int, float) else None) for k, kind in kinds.items()}
    utilisation = values["gpu_memory_utilization"]
    if utilisation is not None and not 0 < utilisation <= 1:
        raise r.fail(f"{path}gpu_memory_utilization", f"must be in (0, 1], got {utilisation}")
    if values["startup_timeout"] is None:
        values["startup_timeout"] = VllmSettings.startup_timeout
    return VllmSettings(**values)


def _apis(r: Reader, data: Mapping[str, Any], path: str, kind: str) -> frozenset[str]:
    value = data.get("apis")
    if value is None:
        return DEFAULT_APIS[kind]
    if not isinstance(value, list) or not all(isinstance(a, str) and a in ENGINE_APIS for a in value):
        raise r.fail(f"{path}apis", f"must be a list of: {', '.join(ENGINE_APIS)}")
    return frozenset(value)
