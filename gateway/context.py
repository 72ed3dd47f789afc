"""What every request of one gateway process shares: settings, metrics, engines, router, clients."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.access import Access, OpenAccess
from gateway.drain import Drain
from gateway.engine_control import EngineControl
from gateway.metrics import GatewayMetrics
from gateway.pool import Pool
from gateway.relay import SendWatchdog, Upstream
from gateway.routing import Router
from gateway.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    metrics: GatewayMetrics
    pool: Pool
    router: Router
    upstream: Upstream
    watchdog: SendWatchdog
    control: EngineControl  # managed engines' states and wakes (scale to zero), from the main process
    drain: Drain  # the graceful shutdown of this process
    access: Access = field(default_factory=OpenAccess)
    started: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        settings: Settings,
        multiprocess_dir: str | None = None,
        drain: Drain | None = None,
        control_path: str | None = None,
    ) -> Gateway:
        metrics = GatewayMetrics(multiprocess_dir)
        pool = Pool(settings.engines, settings.health, metrics)
        router = Router(pool, settings.models, settings.routing)
        return cls(
            settings,
            metrics,
            pool,
            router,
            Upstream(settings.server),
            SendWatchdog(settings.server.send_timeout),
            EngineControl(pool, router, metrics, control_path),
            drain or Drain(),
        )
