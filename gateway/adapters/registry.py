"""Which adapters exist: the config's `adapters.models` plus those added at run time through
`/admin/adapters` (a Redis hash, read by every replica every second), each made a model of the
router (its base model's routes, the adapter's name upstream) and of the gateway's model table."""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

import orjson

from gateway.core.errors import GatewayError, invalid
from gateway.dispatch.routing import Router
from gateway.settings import AdapterSettings, AdaptersSettings, ModelSettings, check_name, check_path

MAX_RUNTIME_ADAPTERS = 1000


class AdapterRegistry:
    def __init__(
        self,
        settings: AdaptersSettings,
        redis: Any,  # the admin client (redis-py): not on the request path
        prefix: str,
        router: Router,
        models: MutableMapping[str, ModelSettings],
    ) -> None:
        self.settings = settings
        self._redis = redis
        self._hash = f"{prefix}:{{lora}}:defs"
        self._router = router
        self._models = models
        self._bases = {name: m for name, m in models.items()}  # the configured models, never adapters
        self.configured = {a.name: a for a in settings.models}
        self.runtime: dict[str, AdapterSettings] = {}
        self._apply()

    @property
    def all(self) -> dict[str, AdapterSettings]:
        return {**self.runtime, **self.configured}

    def _apply(self) -> None:
        adapters = self.all
        self._router.set_adapters({a.name: a.base for a in adapters.values()})
        for name in [n for n in self._models if n not in self._bases and n not in adapters]:
            del self._models[name]
        for a in adapters.values():
            base = self._bases[a.base]
            self._models[a.name] = dataclasses.replace(
                base, name=a.name, routes=self._router.routes[a.name], fallbacks=(), log_payloads=None
            )

    async def refresh(self) -> None:
        raw = await self._redis.hgetall(self._hash)
        runtime: dict[str, AdapterSettings] = {}
        for value in raw.values():
            try:
                d = orjson.loads(value)
                a = AdapterSettings(str(d["name"]), str(d["base"]), str(d["path"]))
            except (ValueError, KeyError, TypeError):
                continue
            if a.base in self._bases and a.name not in self._bases and self._valid(a) is None:
                runtime[a.name] = a
        if runtime != self.runtime:
            self.runtime = runtime
            self._apply()

    def _valid(self, a: AdapterSettings) -> str | None:
        return check_name(a.name) or check_path(a.path, self.settings.directories, self.settings.uris)

    async def add(self, payload: Any) -> AdapterSettings:
        if not isinstance(payload, dict) or payload.keys() - {"name", "base", "path"}:
            raise invalid('Send {"name": ..., "base": MODEL, "path": PATH_OR_URI}.')
        name, base, path = payload.get("name"), payload.get("base"), payload.get("path")
        if (why := check_name(name)) is not None:
            raise invalid(f"'name' {why}.", param="name")
        if name in self._bases or name in self.configured:
            raise GatewayError(409, f"'{name}' is already a model or a configured adapter.", param="name")
        if not isinstance(base, str) or base not in self._bases:
            raise invalid("'base' must name a configured model.", param="base")
        if (why := check_path(path, self.settings.directories, self.settings.uris)) is not None:
            raise invalid(f"'path' {why}.", param="path")
        if name not in self.runtime and await self._redis.hlen(self._hash) >= MAX_RUNTIME_ADAPTERS:
            raise invalid(f"At most {MAX_RUNTIME_ADAPTERS} adapters may be added at run time.")
        adapter = AdapterSettings(str(name), base, str(path))
        await self._redis.hset(self._hash, adapter.name, orjson.dumps(dataclasses.asdict(adapter)))
        self.runtime[adapter.name] = adapter
        self._apply()
        return adapter

    async def remove(self, name: str) -> bool:
        if name in self.configured:
            raise GatewayError(409, f"'{name}' is declared in the config file; remove it there.", param="name")
        removed = bool(await self._redis.hdel(self._hash, name))
        if self.runtime.pop(name, None) is not None:
            self._apply()
        return removed
