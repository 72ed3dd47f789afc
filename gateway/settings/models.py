"""The `models:` section: public model names and their routes (versions: engines, upstream name, weight)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.settings.engines import EngineSettings, resolve_path
from gateway.settings.inference_log import PayloadCapture, parse_log_payloads
from gateway.settings.reader import ConfigError, Reader

ASSIGNMENTS = ("weighted", "sticky")
FAILOVERS = ("resume", "error")
MAX_FALLBACKS = 8
ENDPOINT_KINDS = ("chat", "completions", "embeddings")
EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the CPU engine's bundled embedding model (engines/embeddings.py)
MAX_WEIGHT = 1e9
MAX_ROUTES = 64


@dataclass(frozen=True)
class RouteSettings:
    engines: tuple[str, ...]
    model: str  # the upstream model name
    weight: float = 1.0
    name: str = "v1"  # the version label: x-gateway-route, metrics, the inference log
    adapter: str | None = None  # set on the routes the gateway derives for a LoRA adapter


@dataclass(frozen=True)
class ModelSettings:
    name: str
    routes: tuple[RouteSettings, ...]
    tokenizer: str | None = None  # a tokenizer.json or model directory for exact prompt counts
    assignment: str = "weighted"  # how a request gets its route: weighted (random) or sticky
    max_prompt_bytes: int | None = None  # a request body bound of its own (else server.max_body_bytes)
    # Unset: only the engine's own context limit applies (after it has read the whole prompt).
    max_prompt_tokens: int | None = None  # a longer prompt is refused 400 before an engine sees it
    log_payloads: PayloadCapture | None = None  # sampled body capture in the inference log; off by default
    failover: str = "resume"  # a stream whose engine fails goes on on another engine (resume) or ends (error)
    fallbacks: tuple[str, ...] = ()  # other models to serve it, in order, when this one cannot
    fallback_after: float | None = None  # seconds of queue wait after which a fallback serves instead
    # which APIs the model serves (chat, completions, embeddings): a batch line naming it on
    # another endpoint is refused when the batch is created. Unset: the bundled CPU engines'
    # (embeddings for all-MiniLM-L6-v2, chat and completions otherwise), all three for others.
    endpoints: tuple[str, ...] | None = None
    cache: bool | None = None  # the response cache for this model: on or off (default: cache.enabled)

    def serves(self, kind: str) -> bool:
        return self.endpoints is None or kind in self.endpoints


def parse_model(r: Reader, index: int, data: Any, engines: dict[str, EngineSettings], base_dir: Path) -> ModelSettings:
    path = f"models[{index}]."
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(
        data,
        path,
        (
            "name",
            "routes",
            "tokenizer",
            "assignment",
            "max_prompt_bytes",
            "max_prompt_tokens",
            "log_payloads",
            "failover",
            "fallbacks",
            "fallback_after",
            "endpoints",
            "cache",
        ),
    )
    name = r.get(data, "name", path, str, None)
    if not name:
        raise r.fail(f"{path}name", "is required")
    routes = _routes(r, f"{path}routes", data.get("routes"), name, engines)
    tokenizer = resolve_path(r.get(data, "tokenizer", path, str, None), base_dir)
    assignment = r.get(data, "assignment", path, str, "weighted")
    if assignment not in ASSIGNMENTS:
        raise r.fail(f"{path}assignment", f"must be one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
    max_prompt_bytes = r.get(data, "max_prompt_bytes", path, int, None, 1)
    max_prompt_tokens = r.get(data, "max_prompt_tokens", path, int, None, 1)
    log_payloads = parse_log_payloads(r, f"{path}log_payloads", data.get("log_payloads"))
    failover = r.get(data, "failover", path, str, "resume")
    if failover not in FAILOVERS:
        raise r.fail(f"{path}failover", f"must be one of {', '.join(FAILOVERS)}, got {failover!r}")
    fallbacks = data.get("fallbacks", [])
    if (
        not isinstance(fallbacks, list)
        or len(fallbacks) > MAX_FALLBACKS
        or not all(isinstance(f, str) and f for f in fallbacks)
    ):
        raise r.fail(f"{path}fallbacks", f"must be a list of at most {MAX_FALLBACKS} model names")
    if name in fallbacks or len(set(fallbacks)) != len(fallbacks):
        raise r.fail(f"{path}fallbacks", "must name other models, each once")
    fallback_after = r.get(data, "fallback_after", path, float, None, 0)
    endpoints = _endpoints(r, f"{path}endpoints", data.get("endpoints"), routes, engines)
    return ModelSettings(
        name=name,
        routes=routes,
        tokenizer=tokenizer,
        assignment=assignment,
        max_prompt_bytes=max_prompt_bytes,
        max_prompt_tokens=max_prompt_tokens,
        log_payloads=log_payloads,
        failover=failover,
        fallbacks=tuple(fallbacks),
        fallback_after=fallback_after,
        endpoints=endpoints,
        cache=r.get(data, "cache", path, bool, None),
    )


def check_fallbacks(r: Reader, models: tuple[ModelSettings, ...]) -> None:
    """Every fallback names a configured model."""
    known = {m.name for m in models}
    for i, m in enumerate(models):
        for f in m.fallbacks:
            if f not in known:
                raise r.fail(f"models[{i}].fallbacks", f"unknown model {f!r} (known: {', '.join(sorted(known))})")


def _endpoints(
    r: Reader, path: str, data: Any, routes: tuple[RouteSettings, ...], engines: dict[str, EngineSettings]
) -> tuple[str, ...] | None:
    if data is None:
        kinds: set[str] = set()
        for route in routes:
            for name in route.engines:
                kinds.update(_engine_endpoints(engines[name]))
        return None if kinds == set(ENDPOINT_KINDS) else tuple(k for k in ENDPOINT_KINDS if k in kinds)
    if not isinstance(data, list) or not data or not all(isinstance(k, str) and k in ENDPOINT_KINDS for k in data):
        raise r.fail(path, f"must be a non-empty list of {', '.join(ENDPOINT_KINDS)}")
    return tuple(k for k in ENDPOINT_KINDS if k in data)


def _engine_endpoints(engine: EngineSettings) -> tuple[str, ...]:
    """What an engine serves, where the gateway knows it: its own CPU engine's two kinds of model."""
    if engine.kind == "cpu":
        return ("embeddings",) if Path(engine.model or "").name == EMBEDDING_MODEL else ("chat", "completions")
    return ENDPOINT_KINDS


def parse_routes(
    data: Any, model: str, engines: Mapping[str, EngineSettings], source: str
) -> tuple[RouteSettings, ...]:
    """Routes sent to the admin API, checked as strictly as the config's."""
    return _routes(Reader(source), "routes", data, model, dict(engines))


def _routes(
    r: Reader, path: str, data: Any, public: str, engines: dict[str, EngineSettings]
) -> tuple[RouteSettings, ...]:
    if not isinstance(data, list) or not data:
        raise r.fail(path, "must be a non-empty list")
    if len(data) > MAX_ROUTES:
        raise r.fail(path, f"at most {MAX_ROUTES} routes")
    routes = tuple(_route(r, f"{path}[{i}].", route, i, public, engines) for i, route in enumerate(data))
    if sum(route.weight for route in routes) <= 0:
        raise r.fail(path, "the weights must not all be 0")
    names = [route.name for route in routes]
    if len(names) != len(set(names)):
        raise r.fail(path, f"route names must be unique, got {names}")
    return routes


def _route(
    r: Reader, path: str, data: Any, index: int, public: str, engines: dict[str, EngineSettings]
) -> RouteSettings:
    if not isinstance(data, Mapping):
        raise r.fail(path[:-1], "must be a mapping")
    r.known(data, path, ("engine", "engines", "model", "weight", "name"))
    names = data.get("engines", [data["engine"]] if "engine" in data else None)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise r.fail(f"{path}engines", "give `engine: NAME` or `engines: [NAME, ...]`")
    for n in names:
        if n not in engines:
            raise r.fail(f"{path}engines", f"unknown engine {n!r} (known: {', '.join(engines)})")
    default_upstream = engines[names[0]].served_model_name or public
    name = r.get(data, "name", path, str, f"v{index + 1}")
    if not name or len(name) > 64 or not name.isprintable():
        raise r.fail(f"{path}name", "must be 1 to 64 printable characters")
    return RouteSettings(
        engines=tuple(dict.fromkeys(names)),
        model=r.get(data, "model", path, str, default_upstream),
        weight=r.get(data, "weight", path, float, 1.0, 0, MAX_WEIGHT),
        name=name,
    )


__all__ = ["ConfigError", "ModelSettings", "RouteSettings", "check_fallbacks", "parse_model", "parse_routes"]
