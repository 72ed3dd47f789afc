"""What every request of one gateway process shares: settings, metrics, engines, router, clients, store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.access.base import Access, OpenAccess
from gateway.core.metrics import GatewayMetrics
from gateway.dispatch.routing import Router
from gateway.dispatch.scheduler import Dispatcher, Scheduler, Unscheduled
from gateway.dispatch.wake import EngineControl
from gateway.engines.client import Upstream
from gateway.engines.pool import Pool
from gateway.monitor.writer import InferenceLog
from gateway.observe.observer import Observer
from gateway.proxy.drain import Drain
from gateway.proxy.relay import SendWatchdog
from gateway.settings import Settings
from gateway.store import Store


@dataclass
class Gateway:
    settings: Settings
    metrics: GatewayMetrics
    pool: Pool
    router: Router
    upstream: Upstream
    watchdog: SendWatchdog
    scheduler: Dispatcher  # engine slots: priorities and fair share when engines are full
    control: EngineControl  # managed engines' states and wakes (scale to zero), from the main process
    drain: Drain  # the graceful shutdown of this process
    access: Access = field(default_factory=OpenAccess)
    store: Store | None = None  # files, batches, the inference log: open once gateway/front/store_service.py opened it
    inference_log: InferenceLog | None = None  # None when the log is off (inference_log.enabled)
    observe: Observer | None = None  # access log, traces, Server-Timing; None when all are off
    started: float = field(default_factory=time.time)
    prompt_limits: dict[str, int] = field(default_factory=dict)  # model -> max request bytes

    def __post_init__(self) -> None:
        default = self.settings.server.max_body_bytes
        self.prompt_limits = {m.name: min(default, m.max_prompt_bytes or default) for m in self.settings.models}

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
        scheduler = Scheduler(settings, router, metrics) if settings.scheduler.enabled else Unscheduled(router)
        gw = cls(
            settings,
            metrics,
            pool,
            router,
            Upstream(settings.server),
            SendWatchdog(settings.server.send_timeout),
            scheduler,
            EngineControl(pool, router, metrics, control_path),
            drain or Drain(),
        )
        gw.observe = Observer.build(settings, metrics)
        return gw
