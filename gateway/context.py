"""What every route handler shares within one gateway process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.metrics import GatewayMetrics
from gateway.pool import Pool
from gateway.relay import Upstream
from gateway.routing import Router
from gateway.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    metrics: GatewayMetrics
    pool: Pool
    router: Router
    upstream: Upstream
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, settings: Settings, multiprocess_dir: str | None = None) -> Gateway:
        metrics = GatewayMetrics(multiprocess_dir)
        pool = Pool(settings.engines, settings.health, metrics)
        router = Router(pool, settings.models, routing=settings.routing)
        return cls(settings, metrics, pool, router, Upstream(settings.server))
