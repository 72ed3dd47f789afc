"""Typed settings: one YAML file validated at start, plus the environment for secrets and addresses.

This is the only module that reads environment variables. Errors name the file, the key and what
is wrong, e.g. `configs/x.yaml: models[0].routes[1].weight: must be a number >= 0, got "ten"`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENGINE_KINDS = ("cpu", "openai", "vllm")
MANAGED_KINDS = ("cpu", "vllm")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout: float = 5.0
    first_byte_timeout: float = 120.0  # streaming: until the response headers arrive
    idle_timeout: float = 60.0  # streaming: longest gap between two chunks
    request_timeout: float = 600.0  # non-streaming: the whole answer
    send_timeout: float = 30.0  # a client that reads nothing for this long is dropped


@dataclass(frozen=True)
class RoutingSettings:
    # least_loaded: the engine with the fewest outstanding + queued requests.
    # prefix_affinity: requests whose prompts start alike go to the same engine (its prefix cache
    # then hits), unless that engine is busier than the least-loaded one by more than max_imbalance.
    strategy: str = "least_loaded"
    prefix_chars: int = 1024
    max_imbalance: int = 4


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 1.0
    timeout: float = 2.0
    failures_to_eject: int = 2  # one slow probe under load must not eject a working engine


@dataclass(frozen=True)
class VllmSettings:
    """vLLM engine arguments, turned into `vllm serve` flags by gateway/vllm_launch.py."""

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
    vllm: VllmSettings = field(default_factory=VllmSettings)

    @property
    def managed(self) -> bool:
        return self.kind in MANAGED_KINDS

    @property
    def startup_timeout(self) -> float:
        """How long a managed engine may take to answer /health before it is restarted."""
        return self.vllm.startup_timeout if self.kind == "vllm" else 120.0


@dataclass(frozen=True)
class RouteSettings:
    engines: tuple[str, ...]
    model: str  # the upstream model name
    weight: float = 1.0


@dataclass(frozen=True)
class ModelSettings:
    name: str
    routes: tuple[RouteSettings, ...]
    tokenizer: str | None = None  # a tokenizer.json or model directory for exact prompt counts


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None
    failure_mode: str = "closed"  # closed: 503; open: per-process limits
    timeout: float = 0.25
    prefix: str = "gw"


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = True
    admin_key: str | None = None
    admin_is_client: bool = False
    default_max_tokens: int = 256  # reserved (and set upstream) when a limited key omits max_tokens
    lease_ttl: float = 300.0


@dataclass(frozen=True)
class Settings:
    source: str
    server: ServerSettings
    health: HealthSettings
    routing: RoutingSettings
    engines: tuple[EngineSettings, ...]
    models: tuple[ModelSettings, ...]
    redis: RedisSettings
    auth: AuthSettings

    def engine(self, name: str) -> EngineSettings:
        return next(e for e in self.engines if e.name == name)


class _Reader:
    """Walks the YAML tree and raises ConfigError with the path of the offending key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}")

    def section(self, data: Mapping[str, Any], name: str, path: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"{path}{name}", "must be a mapping")
        return value

    def known(self, data: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail(f"{path}{key}", f"unknown key (allowed: {', '.join(allowed)})")

    def get(
        self, data: Mapping[str, Any], key: str, path: str, kind: type, default: Any, low: float | None = None
    ) -> Any:
        value = data.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(f"{path}{key}", f"must be {kind.__name__}, got {value!r}")
        if low is not None and value < low:
            raise self.fail(f"{path}{key}", f"must be >= {low:g}, got {value!r}")
        return value


def _dataclass_fields(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]


def _simple(r: _Reader, data: Mapping[str, Any], name: str, cls: type) -> Any:
    section = r.section(data, name, "")
    r.known(section, f"{name}.", _dataclass_fields(cls))
    defaults = cls()
    values = {}
    for key in _dataclass_fields(cls):
        default = getattr(defaults, key)
        kind = type(default) if default is not None else str
        low = 0 if kind in (int, float) else None
        values[key] = r.get(section, key, f"{name}.", kind, default, low)
    return cls(**values)


def _engine(r: _Reader, index: int, data: Any, base_dir: Path) -> EngineSettings:
    path = f"engines[{index}]."
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    allowed = (
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
        "vllm",
    )
    r.known(data, path, allowed)
    name = r.get(data, "name", path, str, None)
    if not name:
        raise r.fail(f"{path}name", "is required")
    kind = r.get(data, "kind", path, str, None)
    if kind not in ENGINE_KINDS:
        raise r.fail(f"{path}kind", f"must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    args = data.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise r.fail(f"{path}args", "must be a list of strings")
    env = data.get("env") or {}
    if not isinstance(env, Mapping):
        raise r.fail(f"{path}env", "must be a mapping of names to strings")
    api_key_env = r.get(data, "api_key_env", path, str, None)
    common = {
        "name": name,
        "kind": kind,
        "args": tuple(str(a) for a in args),
        "env": {str(k): str(v) for k, v in env.items()},
        "health_path": r.get(data, "health_path", path, str, "/health"),
        "metrics_path": data.get("metrics_path", "/metrics") or None,
        "api_key": os.environ.get(api_key_env) if api_key_env else None,
        "served_model_name": r.get(data, "served_model_name", path, str, None),
        "max_restarts_per_minute": r.get(data, "max_restarts_per_minute", path, int, 10, 1),
    }
    if "vllm" in data:
        if kind != "vllm":
            raise r.fail(f"{path}vllm", "only engines of kind vllm take vllm arguments")
        common["vllm"] = _vllm(r, data["vllm"], f"{path}vllm.")
    if kind == "openai":
        url = r.get(data, "url", path, str, None)
        if not url or not url.startswith(("http://", "https://")):
            raise r.fail(f"{path}url", "is required for kind openai and must start with http:// or https://")
        return EngineSettings(url=url.rstrip("/"), **common)
    port = r.get(data, "port", path, int, None, 1)
    if port is None or port > 65535:
        raise r.fail(f"{path}port", "is required for a managed engine (1-65535)")
    model = r.get(data, "model", path, str, None)
    if not model:
        raise r.fail(f"{path}model", "is required for a managed engine")
    model = _resolve(model, base_dir) or model
    python = _resolve(r.get(data, "python", path, str, None), base_dir)
    if common["served_model_name"] is None:
        common["served_model_name"] = Path(model).name
    return EngineSettings(url=f"http://127.0.0.1:{port}", model=model, port=port, python=python, **common)


def _resolve(path: str | None, base_dir: Path) -> str | None:
    if path and not Path(path).is_absolute() and (base_dir / path).exists():
        # abspath, not resolve(): a venv's python is a symlink that must stay one.
        return os.path.abspath(base_dir / path)
    return path


def _vllm(r: _Reader, data: Any, path: str) -> VllmSettings:
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, _dataclass_fields(VllmSettings))
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


def _model(r: _Reader, index: int, data: Any, engines: dict[str, EngineSettings], base_dir: Path) -> ModelSettings:
    path = f"models[{index}]."
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, ("name", "routes", "tokenizer"))
    name = r.get(data, "name", path, str, None)
    if not name:
        raise r.fail(f"{path}name", "is required")
    routes = data.get("routes")
    if not isinstance(routes, list) or not routes:
        raise r.fail(f"{path}routes", "must be a non-empty list")
    parsed = tuple(_route(r, f"{path}routes[{i}].", route, name, engines) for i, route in enumerate(routes))
    if sum(route.weight for route in parsed) <= 0:
        raise r.fail(f"{path}routes", "the weights must not all be 0")
    tokenizer = _resolve(r.get(data, "tokenizer", path, str, None), base_dir)
    return ModelSettings(name=name, routes=parsed, tokenizer=tokenizer)


def _route(r: _Reader, path: str, data: Any, public: str, engines: dict[str, EngineSettings]) -> RouteSettings:
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, ("engine", "engines", "model", "weight"))
    names = data.get("engines", [data["engine"]] if "engine" in data else None)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise r.fail(f"{path}engines", "give `engine: NAME` or `engines: [NAME, ...]`")
    for n in names:
        if n not in engines:
            raise r.fail(f"{path}engines", f"unknown engine {n!r} (known: {', '.join(engines)})")
    default_upstream = engines[names[0]].served_model_name or public
    return RouteSettings(
        engines=tuple(names),
        model=r.get(data, "model", path, str, default_upstream),
        weight=r.get(data, "weight", path, float, 1.0, 0),
    )


def parse_routes(
    data: Any, model: str, engines: Mapping[str, EngineSettings], source: str
) -> tuple[RouteSettings, ...]:
    """Routes sent to the admin API, checked as strictly as the config's."""
    r = _Reader(source)
    if not isinstance(data, list) or not data:
        raise r.fail("routes", "must be a non-empty list")
    routes = tuple(_route(r, f"routes[{i}].", route, model, dict(engines)) for i, route in enumerate(data))
    if sum(route.weight for route in routes) <= 0:
        raise r.fail("routes", "the weights must not all be 0")
    return routes


def parse_settings(
    data: Any, source: str = "<config>", base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    r = _Reader(source)
    env = os.environ if env is None else env
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must hold a mapping")
    r.known(data, "", ("server", "health", "routing", "engines", "models", "redis", "auth"))
    base_dir = base_dir or Path.cwd()
    raw_engines = data.get("engines")
    if not isinstance(raw_engines, list) or not raw_engines:
        raise r.fail("engines", "must be a non-empty list")
    engines: dict[str, EngineSettings] = {}
    for i, e in enumerate(raw_engines):
        engine = _engine(r, i, e, base_dir)
        if engine.name in engines:
            raise r.fail(f"engines[{i}].name", f"duplicate engine name {engine.name!r}")
        engines[engine.name] = engine
    ports = [e.port for e in engines.values() if e.port]
    if len(ports) != len(set(ports)):
        raise r.fail("engines", "two managed engines share a port")
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise r.fail("models", "must be a non-empty list")
    models = tuple(_model(r, i, m, engines, base_dir) for i, m in enumerate(raw_models))
    names = [m.name for m in models]
    if len(names) != len(set(names)):
        raise r.fail("models", "two models share a name")
    redis = _simple(r, data, "redis", RedisSettings)
    if redis.failure_mode not in ("closed", "open"):
        raise r.fail("redis.failure_mode", f"must be closed or open, got {redis.failure_mode!r}")
    if env.get("GATEWAY_REDIS_URL"):
        redis = RedisSettings(env["GATEWAY_REDIS_URL"], redis.failure_mode, redis.timeout, redis.prefix)
    auth = _simple(r, data, "auth", AuthSettings)
    admin_key = env.get("GATEWAY_ADMIN_KEY") or None
    auth = AuthSettings(auth.enabled, admin_key, auth.admin_is_client, auth.default_max_tokens, auth.lease_ttl)
    if auth.enabled and not redis.url:
        raise r.fail("auth.enabled", "API keys and quotas need Redis: set redis.url or GATEWAY_REDIS_URL")
    routing = _simple(r, data, "routing", RoutingSettings)
    if routing.strategy not in ("least_loaded", "prefix_affinity"):
        raise r.fail("routing.strategy", f"must be least_loaded or prefix_affinity, got {routing.strategy!r}")
    server = _simple(r, data, "server", ServerSettings)
    if server.workers < 1:
        raise r.fail("server.workers", "must be at least 1")
    return Settings(
        source=source,
        server=server,
        health=_simple(r, data, "health", HealthSettings),
        routing=routing,
        engines=tuple(engines.values()),
        models=models,
        redis=redis,
        auth=auth,
    )


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, str(path), base_dir=_project_root(path), env=env)


def _project_root(config_path: Path) -> Path:
    """Relative model paths are resolved from the directory above `configs/` (the project root)."""
    parent = config_path.resolve().parent
    return parent.parent if parent.name == "configs" else parent


CONFIG_ENV = "LLM_GATEWAY_CONFIG"


def settings_from_env() -> Settings:
    """For uvicorn worker processes: the CLI puts the config path in the environment."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: start the gateway with `llm-gateway serve --config FILE`")
    return load_settings(path)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def admin_client_settings(url: str | None) -> tuple[str, str | None]:
    """For the `keys` CLI: the gateway's address and the admin key, from flags or the environment."""
    base = url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8080"
    return base.rstrip("/"), os.environ.get("GATEWAY_ADMIN_KEY") or None
