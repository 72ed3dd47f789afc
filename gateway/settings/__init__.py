"""Typed settings: one YAML file validated at start, plus the environment for secrets and addresses.

This package is the only place that reads environment variables. Errors name the file, the key
and what is wrong. Each section has its parser in a module of its own: `server`, `sections`
(health, routing, redis, auth), `engines`, `models`, `batch` (files, batch), `scheduler`,
`inference_log`, `observe` (tracing, logging); the store's section is parsed by gateway/settings/store.py; `reader` walks the tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gateway.settings.adapters import AdapterSettings, AdaptersSettings, check_name, check_path, parse_adapters
from gateway.settings.batch import BatchSettings, FilesSettings, parse_batch, parse_files
from gateway.settings.cache import CacheSettings, parse_cache
from gateway.settings.engines import ENGINE_KINDS, MANAGED_KINDS, EngineSettings, VllmSettings, parse_engine
from gateway.settings.inference_log import InferenceLogSettings, PayloadCapture, parse_inference_log
from gateway.settings.leases import LeaseSettings, parse_leases
from gateway.settings.models import ModelSettings, RouteSettings, check_fallbacks, parse_model, parse_routes
from gateway.settings.observe import (
    AccessLogSettings,
    LoggingSettings,
    TracingSettings,
    parse_logging,
    parse_tracing,
)
from gateway.settings.pricing import NANOS, Price, PricingSettings, parse_pricing
from gateway.settings.reader import ConfigError, Reader
from gateway.settings.scheduler import SchedulerSettings, parse_scheduler
from gateway.settings.sections import (
    AuthSettings,
    HealthSettings,
    RedisSettings,
    RoutingSettings,
    parse_auth,
    parse_health,
    parse_redis,
    parse_routing,
)
from gateway.settings.server import ServerSettings, TlsSettings, parse_server
from gateway.settings.store import StoreConfigError, StoreSettings, parse_store_settings

SECTIONS = (
    "server",
    "health",
    "routing",
    "engines",
    "models",
    "redis",
    "auth",
    "leases",
    "store",
    "inference_log",
    "scheduler",
    "files",
    "batch",
    "pricing",
    "tracing",
    "logging",
    "cache",
    "adapters",
)


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
    leases: LeaseSettings = field(default_factory=LeaseSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    inference_log: InferenceLogSettings = field(default_factory=InferenceLogSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    files: FilesSettings = field(default_factory=FilesSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    adapters: AdaptersSettings | None = None  # None: no `adapters:` section, LoRA off


def parse_settings(
    data: Any, source: str = "<config>", base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    r = Reader(source)
    env = os.environ if env is None else env
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must hold a mapping")
    r.known(data, "", SECTIONS)
    base_dir = base_dir or Path.cwd()
    raw_engines = data.get("engines")
    if not isinstance(raw_engines, list) or not raw_engines:
        raise r.fail("engines", "must be a non-empty list")
    engines: dict[str, EngineSettings] = {}
    for i, e in enumerate(raw_engines):
        engine = parse_engine(r, i, e, base_dir, env)
        if engine.name in engines:
            raise r.fail(f"engines[{i}].name", f"duplicate engine name {engine.name!r}")
        engines[engine.name] = engine
    ports = [e.port for e in engines.values() if e.port]
    if len(ports) != len(set(ports)):
        raise r.fail("engines", "two managed engines share a port")
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise r.fail("models", "must be a non-empty list")
    models = tuple(parse_model(r, i, m, engines, base_dir) for i, m in enumerate(raw_models))
    names = [m.name for m in models]
    if len(names) != len(set(names)):
        raise r.fail("models", "two models share a name")
    check_fallbacks(r, models)
    adapters = parse_adapters(r, data, set(names))
    if adapters is not None:  # engines of every model may serve adapters: managed vLLM starts with LoRA on
        engines = {n: e if e.max_loras else replace(e, max_loras=1) for n, e in engines.items()}
    redis = parse_redis(r, data, env)
    auth = parse_auth(r, data, env)
    if auth.enabled and not redis.url:
        raise r.fail("auth.enabled", "API keys and quotas need Redis: set redis.url or GATEWAY_REDIS_URL")
    try:
        store = parse_store_settings(data.get("store"), base_dir=base_dir, env=env)
    except StoreConfigError as exc:
        raise r.fail(exc.key, exc.problem) from None
    return Settings(
        source=source,
        server=parse_server(r, data, base_dir),
        health=parse_health(r, data),
        routing=parse_routing(r, data),
        engines=tuple(engines.values()),
        models=models,
        redis=redis,
        auth=auth,
        leases=parse_leases(r, data),
        store=store,
        inference_log=parse_inference_log(r, data),
        scheduler=parse_scheduler(r, data),
        files=parse_files(r, data),
        batch=parse_batch(r, data),
        pricing=parse_pricing(r, data, set(names), env),
        tracing=parse_tracing(r, data, env),
        logging=parse_logging(r, data, base_dir),
        cache=parse_cache(r, data),
        adapters=adapters,
    )


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    return parse_text(read_config(path), path, env)


def read_config(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror}") from None


def parse_text(text: str, path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """The settings of a config file's text, as `load_settings` reads the file at `path`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, str(path), base_dir=_project_root(Path(path)), env=env)


def _project_root(config_path: Path) -> Path:
    """Relative model paths are resolved from the directory above `configs/` (the project root)."""
    parent = config_path.resolve().parent
    return parent.parent if parent.name == "configs" else parent


CONFIG_ENV = "LLM_GATEWAY_CONFIG"


def config_path_from_env() -> str:
    """For running the app under another ASGI server: the config file named in the environment."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: start the gateway with `llm-gateway serve --config FILE`")
    return path


def admin_token() -> str | None:
    """For the CLI: a provider's access token for the admin API, when there is no admin key."""
    return os.environ.get("GATEWAY_ADMIN_TOKEN") or None


def admin_client_settings(url: str | None) -> tuple[str, str | None]:
    """For the `keys` CLI: the gateway's address and the admin key, from flags or the environment."""
    base = url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8080"
    return base.rstrip("/"), os.environ.get("GATEWAY_ADMIN_KEY") or None


__all__ = [
    "CONFIG_ENV",
    "ENGINE_KINDS",
    "MANAGED_KINDS",
    "NANOS",
    "AccessLogSettings",
    "AdapterSettings",
    "AdaptersSettings",
    "AuthSettings",
    "BatchSettings",
    "CacheSettings",
    "ConfigError",
    "EngineSettings",
    "FilesSettings",
    "HealthSettings",
    "InferenceLogSettings",
    "LeaseSettings",
    "LoggingSettings",
    "ModelSettings",
    "PayloadCapture",
    "Price",
    "PricingSettings",
    "RedisSettings",
    "RouteSettings",
    "RoutingSettings",
    "SchedulerSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "TlsSettings",
    "TracingSettings",
    "VllmSettings",
    "check_name",
    "check_path",
    "load_settings",
    "parse_routes",
    "parse_settings",
    "parse_text",
    "read_config",
]
