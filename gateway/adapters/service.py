"""The adapters of one gateway process: the registry (which exist) and the placement (where they
are loaded), with the background sweep that keeps both in step with the other replicas."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from gateway.adapters.placement import Placement, stop_task
from gateway.adapters.registry import AdapterRegistry
from gateway.core.metrics import GatewayMetrics
from gateway.dispatch.routing import Router
from gateway.engines.client import Upstream
from gateway.engines.pool import Engine
from gateway.resp.connect import RedisClients
from gateway.settings import AdaptersSettings, ModelSettings


class Adapters:
    def __init__(
        self,
        settings: AdaptersSettings,
        clients: RedisClients,
        prefix: str,
        router: Router,
        models: MutableMapping[str, ModelSettings],
        upstream: Upstream,
        metrics: GatewayMetrics,
    ) -> None:
        self.registry = AdapterRegistry(settings, clients.admin, prefix, router, models)
        self.placement = Placement(clients.lean, prefix, router.pool, upstream, metrics, settings.load_timeout)
        self.placement.adapters = self.registry.all
        self._task: asyncio.Task[None] | None = None

    async def _refresh(self) -> None:
        await self.registry.refresh()
        self.placement.adapters = self.registry.all

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.placement.run(self._refresh))

    async def stop(self) -> None:
        await stop_task(self._task)

    async def add(self, payload: Any) -> dict[str, Any]:
        adapter = await self.registry.add(payload)
        self.placement.adapters = self.registry.all
        return self.public(adapter.name)

    def public(self, name: str) -> dict[str, Any]:
        a = self.registry.all[name]
        where = [e.name for e in self.placement.pool.engines.values() if name in e.adapters]
        return {
            "id": a.name,
            "object": "adapter",
            "base": a.base,
            "path": a.path,
            "source": "config" if name in self.registry.configured else "admin",
            "loaded_on": where,
        }

    def engine_view(self, engine: Engine) -> list[dict[str, Any]]:
        return self.placement.view(engine)
