"""LoRA adapters on the CPU engine: each resident adapter is a merged copy of the model.

transformers' continuous batching runs one model over one packed batch, with no way to pick an
adapter per request, and PEFT's per-request `adapter_names=` needs a padded batch. So each
adapter gets a model of its own: the base weights loaded again, the adapter merged into them
with PEFT (`merge_and_unload`), and a continuous-batching engine over it. Requests for the
adapter are batched together at full speed, apart from the base model's. The cost is memory:
per resident adapter, one more copy of the weights and one more KV cache, which is why
`max_loras` bounds how many are resident at once.

Like vLLM, any number of adapters may be *registered* (loaded by name); at most `max_loras` are
resident. Loading one more evicts the least recently used idle one; a request for an evicted
adapter loads it again from its path (evicting another). When every resident adapter is busy,
a request that needs another one is answered 429 (vLLM would queue it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engines.engine import EngineStats
from engines.errors import EngineError
from engines.metrics import WorkerMetrics
from engines.serving import Serving
from engines.tokenizing import PromptTokenizer

if TYPE_CHECKING:
    from engines.cpu import CpuEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # never pickled .bin weights: loading those runs code


class AdapterLoadError(Exception):
    """The files are there but do not make an adapter of this model (a client's mistake: 400)."""


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path  # resolved, checked against the allowed directories when it was loaded
    shown_path: str  # as the client gave it (GET /v1/models shows it as `root`, like vLLM)
    engine: CpuEngine | None = None  # None while not resident
    serving: Serving | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False  # unloaded or replaced: its engine stops when its last request ends


@dataclass(frozen=True, slots=True)
class Lease:
    serving: Serving
    release: Callable[[], None]


class LoraAdapters:
    def __init__(
        self, base: CpuEngine, base_name: str, metrics: WorkerMetrics, prompts: PromptTokenizer, max_loras: int
    ) -> None:
        self.base = base
        self.base_name = base_name
        self.max_loras = max_loras
        self._metrics = metrics
        self._prompts = prompts  # the base model's tokenizer serves its adapters too
        self._adapters: dict[str, Adapter] = {}
        self._lock = asyncio.Lock()  # loads, unloads and evictions, one at a time

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def registered(self) -> list[Adapter]:
        return list(self._adapters.values())

    def resident(self) -> list[Adapter]:
        return [a for a in self._adapters.values() if a.engine is not None]

    async def _locked(self, work: Callable[[], Awaitable[T]]) -> T:
        """Runs `work` under the lock to its end, even if the caller leaves meanwhile (a client
        that hangs up): a model half built, or built and then dropped, would leak its loop."""

        async def run() -> T:
            async with self._lock:
                return await work()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"
        return await asyncio.shield(task)

    async def load(self, name: str, path: Path, shown_path: str, replace: bool) -> None:
        """Registers `name` and makes it resident (evicting the least recently used idle one)."""

        async def work() -> None:
            old = self._adapters.get(name)
            if old is not None and not replace:
                raise ValueError(name)
            adapter = Adapter(name, path, shown_path)
            await self._make_resident(adapter, spare=old)
            self._adapters[name] = adapter
            if old is not None:
                self._retire(old)
            log.info("loaded LoRA adapter %s from %s", name, path)

        await self._locked(work)

    async def unload(self, name: str) -> bool:
        async def work() -> bool:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                return False
            running = adapter.in_flight  # they finish on it; the gateway never unloads one in use
            self._retire(adapter)
            log.info("unloaded LoRA adapter %s (%d requests in flight)", name, running)
            return True

        return await self._locked(work)

    async def acquire(self, name: str) -> Lease:
        """The adapter's serving, held until `release` (so it is not evicted mid-request)."""
        adapter = self._adapters[name]
        if adapter.serving is None:

            async def work() -> None:
                if adapter.retired:
                    raise KeyError(name)
                if adapter.serving is None:
                    await self._make_resident(adapter)

            await self._locked(work)
        if adapter.serving is None:  # evicted again between the load and now (another adapter's turn)
            raise EngineError(429, "The LoRA adapter was evicted by another; retry.", code="engine_overloaded")
        adapter.in_flight += 1
        adapter.last_used = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                adapter.in_flight -= 1
                adapter.last_used = time.monotonic()
                if adapter.retired and adapter.in_flight == 0:
                    self._stop_later(adapter)

        return Lease(adapter.serving, release)

    async def _make_resident(self, adapter: Adapter, spare: Adapter | None = None) -> None:
        """Builds the adapter's engine; `spare` (the adapter it replaces) is not evicted for it."""
        others = [a for a in self.resident() if a is not spare]
        if len(others) >= self.max_loras:
            idle = [a for a in others if a.in_flight == 0]
            if not idle:
                raise EngineError(
                    429,
                    f"All {self.max_loras} LoRA adapter slots are busy with requests; retry later.",
                    code="engine_overloaded",
                )
            victim = min(idle, key=lambda a: a.last_used)
            engine, victim.engine, victim.serving = victim.engine, None, None
            log.info("evicted LoRA adapter %s (max_loras=%d)", victim.name, self.max_loras)
            if engine is not None:
                await asyncio.to_thread(engine.stop)
        engine = await asyncio.to_thread(self._build, adapter.path)
        adapter.engine = engine
        adapter.serving = Serving(engine, adapter.name, self._metrics, prompts=self._prompts)

    def _build(self, path: Path) -> CpuEngine:
        """A started engine over the base model with the adapter merged in (blocking: seconds)."""
        from peft import PeftModel

        from engines.cpu import CpuEngine, load_model

        config = self.base.config
        try:
            merged = PeftModel.from_pretrained(load_model(config.model_path), str(path)).merge_and_unload()
        except MemoryError:
            raise
        except Exception as exc:  # PEFT's and safetensors' own errors for files that do not fit the model
            raise AdapterLoadError(f"{type(exc).__name__}: {exc}") from None
        engine = CpuEngine(config, model=merged.eval(), tokenizer=self.base.tokenizer)
        engine.start()
        return engine

    def _retire(self, adapter: Adapter) -> None:
        adapter.retired = True
        if adapter.in_flight == 0:
            self._stop_later(adapter)

    def _stop_later(self, adapter: Adapter) -> None:
        engine, adapter.engine, adapter.serving = adapter.engine, None, None
        if engine is not None:
            asyncio.get_running_loop().run_in_executor(None, engine.stop)

    def health(self) -> str | None:
        for adapter in self.resident():
            assert adapter.engine is not None
            problem = adapter.engine.health()
            if problem is not None:
                return f"LoRA adapter {adapter.name}: {problem}"
        return None

    def stats(self) -> list[EngineStats]:
        return [a.engine.stats() for a in self.resident() if a.engine is not None]

    def stop(self) -> None:
        for adapter in self._adapters.values():
            if adapter.engine is not None:
                adapter.engine.stop()
                adapter.engine = adapter.serving = None


def card(adapter: Adapter, parent: str, created: int) -> dict[str, Any]:
    """The adapter's entry in GET /v1/models, shaped as vLLM's."""
    return {
        "id": adapter.name,
        "object": "model",
        "created": created,
        "owned_by": "llm-gateway",
        "root": adapter.shown_path,
        "parent": parent,
    }
