"""The small flat sections of the config file: health, routing, redis, auth (server: server.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.settings.oidc import OidcSettings, parse_oidc
from gateway.settings.reader import Reader, simple_section
from gateway.settings.redis_url import parse_redis_url


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 1.0
    timeout: float = 2.0
    failures_to_eject: int = 2  # one slow probe under load must not eject a working engine
    # The circuit breaker per engine (refused, no first byte within server.first_byte_timeout or
    # request_timeout, a 5xx answer, a stream broken mid-way all count as failed requests).
    breaker_failures: int = 3  # failed requests in a row that take an engine out; 0: off
    breaker_cooldown: float = 10.0  # seconds an open breaker keeps traffic off; then one request is its trial


ROUTING_PLUGINS = ("least_loaded", "prefix_affinity", "kv_cache")  # gateway/dispatch/routing/plugins.py
_STRATEGIES = {"least_loaded": ("least_loaded",), "prefix_affinity": ("prefix_affinity", "least_loaded")}


@dataclass(frozen=True)
class RoutingSettings:
    # The engine-choice plugins, applied in order (gateway/dispatch/routing/): least_loaded scores by the
    # requests in flight plus the engine's queue; prefix_affinity keeps requests whose prompts
    # start alike on one engine (its prefix cache then hits) while it is at most max_imbalance
    # busier than the least-loaded one; kv_cache prefers engines with free KV cache.
    plugins: tuple[str, ...] = ("least_loaded",)
    prefix_chars: int = 1024
    max_imbalance: int = 4


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None  # redis://, rediss:// (TLS), redis+cluster://host:port,host:port,...
    failure_mode: str = "closed"  # closed: 503; open: per-process limits
    timeout: float = 0.25
    prefix: str = "gw"
    cluster: bool = False  # a Redis Cluster reached through the URL's host(s)


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = True
    admin_key: str | None = None
    admin_is_client: bool = False
    default_max_tokens: int = 256  # reserved (and set upstream) when a limited key omits max_tokens
    lease_ttl: float = 300.0
    oidc: OidcSettings | None = None  # single sign-on (gateway/settings/oidc.py)


def parse_routing(r: Reader, data: Mapping[str, Any]) -> RoutingSettings:
    section = r.section(data, "routing", "")
    r.known(section, "routing.", ("strategy", "plugins", "prefix_chars", "max_imbalance"))
    plugins: tuple[str, ...] = RoutingSettings.plugins
    if "strategy" in section:  # the older spelling: one name for a fixed set of plugins
        strategy = section["strategy"]
        if strategy not in _STRATEGIES:
            raise r.fail("routing.strategy", f"must be least_loaded or prefix_affinity, got {strategy!r}")
        plugins = _STRATEGIES[strategy]
    if "plugins" in section:
        raw = section["plugins"]
        if not isinstance(raw, list) or not raw or not all(p in ROUTING_PLUGINS for p in raw):
            raise r.fail("routing.plugins", f"must be a non-empty list of {', '.join(ROUTING_PLUGINS)}")
        plugins = tuple(dict.fromkeys(raw))
    return RoutingSettings(
        plugins=plugins,
        prefix_chars=r.get(section, "prefix_chars", "routing.", int, 1024, 1),
        max_imbalance=r.get(section, "max_imbalance", "routing.", int, 4, 0),
    )


def parse_redis(r: Reader, data: Mapping[str, Any], env: Mapping[str, str]) -> RedisSettings:
    redis = simple_section(r, data, "redis", RedisSettings)
    if redis.failure_mode not in ("closed", "open"):
        raise r.fail("redis.failure_mode", f"must be closed or open, got {redis.failure_mode!r}")
    if env.get("GATEWAY_REDIS_URL"):
        redis = replace(redis, url=env["GATEWAY_REDIS_URL"])
    if redis.url is not None:
        try:
            target = parse_redis_url(redis.url, redis.cluster)
        except ValueError as exc:
            raise r.fail("redis.url", str(exc)) from None
        redis = replace(redis, cluster=target.cluster)
    return redis


def parse_auth(r: Reader, data: Mapping[str, Any], env: Mapping[str, str]) -> AuthSettings:
    section = r.section(data, "auth", "")
    oidc = parse_oidc(r, section, env)
    auth = simple_section(r, {"auth": {k: v for k, v in section.items() if k != "oidc"}}, "auth", AuthSettings)
    admin_key = env.get("GATEWAY_ADMIN_KEY") or None
    return AuthSettings(auth.enabled, admin_key, auth.admin_is_client, auth.default_max_tokens, auth.lease_ttl, oidc)


def parse_health(r: Reader, data: Mapping[str, Any]) -> HealthSettings:
    return simple_section(r, data, "health", HealthSettings)
