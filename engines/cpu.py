"""CPU generation engine on transformers' own continuous batching (ContinuousBatchingManager).

The manager runs its generation loop on a background thread: every step it admits waiting
requests into the running batch, runs one forward pass over all of them, and retires the ones
that finished. Its outputs reach the asyncio loop through `register_result_handler`, which
calls back on the loop with `call_soon_threadsafe`, so no thread ever blocks on a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from engines import scheduling
from engines.engine import EngineStats, Slots
from engines.errors import EngineError
from engines.protocol import SamplingParams
from engines.tokenizing import chat_ids, text_ids

log = logging.getLogger(__name__)

# Per-request temperature and top_p only exist in the manager when the default config asks for
# them (a value of exactly 1.0 creates no processor), so the defaults sit just off neutral and
# every request passes its own values.
_DEFAULT_TEMPERATURE = 0.999
_DEFAULT_TOP_P = 0.999
# Sampling is global to the manager; a temperature this low makes the softmax one-hot, which is
# greedy decoding for requests that ask for temperature 0.
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class CpuEngineConfig:
    model_path: Path
    num_blocks: int = 256  # KV cache size in blocks of page_size tokens: bounds memory
    page_size: int = 64
    max_batch_tokens: int = 1024
    max_waiting: int = 64  # past this many queued requests the worker answers 429 at once
    max_model_len: int | None = None
    threads: int | None = None
    # With work pending, a generation loop that neither steps nor delivers for this long is stuck:
    # /health turns 503 so that a gateway stops sending it traffic.
    stall_seconds: float = 15.0


def load_model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class CpuEngine:
    def __init__(self, config: CpuEngineConfig, model: Any = None, tokenizer: Any = None) -> None:
        """`model` and `tokenizer`, when given, are used instead of loading them from
        config.model_path (an adapter's merged copy of the model shares the base's tokenizer)."""
        self.config = config
        self.tokenizer_path = config.model_path
        if config.threads:
            torch.set_num_threads(config.threads)
        self._tokenizer: Any = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(config.model_path)
        self._model = model if model is not None else load_model(config.model_path)
        model_config = self._model.config
        generation = GenerationConfig.from_model_config(model_config)
        eos = generation.eos_token_id if generation.eos_token_id is not None else self._tokenizer.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = frozenset(int(e) for e in eos_ids if e is not None)
        cache_tokens = config.num_blocks * config.page_size
        limits = [model_config.max_position_embeddings, cache_tokens]
        if config.max_model_len:
            limits.append(config.max_model_len)
        self.context_length = min(limits)
        self._generation_config = GenerationConfig(
            do_sample=True,
            temperature=_DEFAULT_TEMPERATURE,
            top_p=_DEFAULT_TOP_P,
            max_new_tokens=self.context_length,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self._tokenizer.pad_token_id,
        )
        self._cb_config = ContinuousBatchingConfig(
            num_blocks=config.num_blocks,
            page_size=config.page_size,
            max_batch_tokens=config.max_batch_tokens,
            per_request_processors=True,
            allow_block_sharing=True,
            scheduler_type=scheduling.register(),
        )
        self._manager: Any = None
        self._waiting = 0
        self._running = 0
        self._reserved = 0  # queue places promised to requests whose response has not started yet
        # Progress heartbeat of the generation loop: the step counter last seen and when it moved,
        # and when the engine last had nothing to do (a stall is only counted while work waits).
        self._last_step = -1
        self._last_progress = time.monotonic()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def start(self) -> None:
        self._manager = self._model.init_continuous_batching(
            generation_config=self._generation_config, continuous_batching_config=self._cb_config
        )
        self._manager.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Holds the generation loop between two steps (blocking until it is there), keeping its
        batch and cache, e.g. to change the model in place. Call it off the event loop."""
        with self._manager.pause():
            yield

    def stop(self) -> None:
        if self._manager is not None:
            self._manager.stop(block=True, timeout=10, hard_stop=True)
            self._manager = None

    def chat_prompt(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]:
        return chat_ids(self._tokenizer, messages, continue_final)

    def text_prompt(self, text: str) -> list[int]:
        return text_ids(self._tokenizer, text)

    def stats(self) -> EngineStats:
        total = used = 0
        processor = self._manager.batch_processor if self._manager is not None else None
        if processor is not None:
            cache = processor.cache
            total = int(cache.num_blocks)
            used = round(total * (1.0 - float(cache.compute_free_capacity())))
        waiting = self._waiting + self._reserved
        return EngineStats(running=self._running, waiting=waiting, kv_blocks_used=used, kv_blocks_total=total)

    def is_alive(self) -> bool:
        return self._manager is not None and self._manager.is_running()

    def stalled_for(self) -> float:
        """Seconds the generation loop has made no progress while requests were pending (0 if it
        is making progress or has nothing to do). Sampled when asked: cheap enough for /health."""
        now = time.monotonic()
        manager = self._manager
        step = int(getattr(manager, "current_batch", 0) or 0) if manager is not None else 0
        if step != self._last_step or self._waiting + self._running == 0:
            self._last_step = step
            self._last_progress = now
            return 0.0
        return now - self._last_progress

    def health(self) -> str | None:
        """None when healthy, else why not."""
        if not self.is_alive():
            return "the generation loop is not running"
        stalled = self.stalled_for()
        if stalled > self.config.stall_seconds:
            return f"the generation loop has made no progress for {stalled:.0f}s with requests pending"
        return None

    def reserve(self, requests: int) -> Slots:
        if self._waiting + self._reserved + requests > self.config.max_waiting:
            raise EngineError(429, "The engine's waiting queue is full; retry later.", code="engine_overloaded")
        self._reserved += requests
        return Slots(self, requests)

    def _unreserve(self, requests: int) -> None:
        self._reserved -= requests

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, slots: Slots
    ) -> AsyncGenerator[list[int], None]:
        slots.take()
        if not self.is_alive():
            raise EngineError(503, "The engine is not running.", code="engine_unavailable")
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        manager = self._manager

        def deliver(output: GenerationOutput) -> None:
            self._last_progress = time.monotonic()
            outputs.put_nowait(output)

        manager.register_result_handler(request_id, deliver)
        # EOS handling moves to the serving layer when EOS must be ignored for a while.
        eos: int | list[int] | None = -1 if params.ignore_eos or params.min_tokens else None
        if self._waiting + self._running == 0:
            self._last_progress = time.monotonic()  # the stall clock starts when work arrives
        self._waiting += 1
        state = "waiting"
        try:
            manager.add_request(
                prompt_ids,
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=eos,
                temperature=max(params.temperature, _GREEDY_TEMPERATURE),
                top_p=params.top_p,
            )
            seen = 0
            while True:
                output = await outputs.get()
                if output.status == RequestStatus.FAILED:
                    raise EngineError(500, f"Generation failed: {output.error}", code="engine_error")
                if state == "waiting":
                    state = "running"
                    self._waiting -= 1
                    self._running += 1
                new = output.generated_tokens[seen:]
                seen += len(new)
                if new:
                    yield new
                if output.is_finished():
                    state = "finished"
                    return
        finally:
            if state == "waiting":
                self._waiting -= 1
            elif state == "running":
                self._running -= 1
            if state != "finished":
                # Aborted by the caller (client gone, stop string hit) or failed: free the slot now.
                manager.cancel_request(request_id)
                with manager.output_router._lock:
                    manager.output_router.result_handlers.pop(request_id, None)
            else:
                self._running -= 1
