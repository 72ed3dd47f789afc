"""OpenAI chat and completion responses, streamed or whole, on top of a GenerationEngine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from engines.engine import GenerationEngine, Slots
from engines.errors import EngineError, invalid
from engines.metrics import WorkerMetrics
from engines.protocol import GenerateRequest, SamplingParams
from engines.textstream import TextStream
from engines.tokenizing import PromptTokenizer


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(slots=True)
class Prepared:
    """A validated request with its prompts tokenized and its token budget settled."""

    request: GenerateRequest
    prompts: list[list[int]]
    max_new_tokens: int
    chat: bool
    slots: Slots  # queue places promised to this request; release() them when it ends

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Serving:
    def __init__(
        self, engine: GenerationEngine, model_name: str, metrics: WorkerMetrics, prompts: PromptTokenizer | None = None
    ) -> None:
        """`prompts` shares one tokenizer (and its child process) between servings of one model."""
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.prompts = prompts or PromptTokenizer(engine.tokenizer, engine.tokenizer_path, engine.context_length)

    async def prepare(self, request: GenerateRequest) -> Prepared:
        prompts, max_new = await self._tokenized(request)
        # The queue counters belong to the event loop's thread: the reservation is made here.
        slots = self.engine.reserve(len(prompts) * request.sampling.n)
        return Prepared(request, prompts, max_new, request.messages is not None, slots)

    async def aclose(self) -> None:
        await self.prompts.aclose()

    async def _tokenized(self, request: GenerateRequest) -> tuple[list[list[int]], int]:
        """The prompts as token ids and the completion's token budget."""
        engine = self.engine
        # An int stands for a prompt too long to keep the ids of: its token count.
        prompts: list[list[int] | int] = []
        if request.messages is not None:
            messages = [dict(m) for m in request.messages]
            prompts.append(await self.prompts.chat(messages, request.continue_final_message))
        else:
            vocab = len(engine.tokenizer)  # type: ignore[arg-type]
            for p in request.prompts:
                if isinstance(p, str):
                    prompts.append(await self.prompts.text(p))
                elif max(p) >= vocab:
                    raise invalid(f"Token id {max(p)} is outside the vocabulary (size {vocab}).", param="prompt")
                else:
                    prompts.append(list(p))
        longest = max(p if isinstance(p, int) else len(p) for p in prompts)
        limit = engine.context_length
        param = "messages" if request.messages is not None else "prompt"
        if longest >= limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens, but the prompt has {longest} "
                "tokens. "
                "Shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        wanted = request.sampling.max_tokens
        if wanted is not None and longest + wanted > limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{longest + wanted} tokens ({longest} in the {param}, {wanted} in the completion). "
                "Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_new = wanted if wanted is not None else limit - longest
        return [p for p in prompts if not isinstance(p, int)], max_new

    async def choices(self, prepared: Prepared) -> AsyncGenerator[ChoiceDelta, None]:
        """Runs every choice (prompts x n) concurrently and yields their deltas as they come."""
        n = prepared.request.sampling.n
        jobs = [(i * n + j, ids) for i, ids in enumerate(prepared.prompts) for j in range(n)]
        base = uuid.uuid4().hex
        if len(jobs) == 1:
            async with aclosing(self._one(f"{base}-0", 0, jobs[0][1], prepared)) as only:
                async for delta in only:
                    yield delta
            return
        queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()

        async def pump(index: int, ids: list[int]) -> None:
            try:
                async with aclosing(self._one(f"{base}-{index}", index, ids, prepared)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait(delta)
            except Exception as exc:
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(index, ids)) for index, ids in jobs]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    remaining -= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(
        self, request_id: str, index: int, prompt_ids: list[int], prepared: Prepared
    ) -> AsyncGenerator[ChoiceDelta, None]:
        params: SamplingParams = prepared.request.sampling
        stream = TextStream(self.engine.tokenizer, params.stop)
        eos_ids = self.engine.eos_token_ids
        # With EOS switched off in the engine (ignore_eos, min_tokens), the serving layer decides.
        honour_eos = not params.ignore_eos
        count = 0
        finish = "length"
        started = time.perf_counter()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        generated = self.engine.generate(request_id, prompt_ids, params, prepared.max_new_tokens, prepared.slots)
        async with aclosing(generated):
            async for new_ids in generated:
                if count == 0:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                ended = False
                for position, token in enumerate(new_ids):
                    if honour_eos and token in eos_ids and count >= params.min_tokens:
                        new_ids = new_ids[: position + 1]
                        finish, ended = "stop", True
                        break
                count += len(new_ids)
                text = stream.push(new_ids)
                if stream.stopped:
                    finish, ended = "stop", True
                if text:
                    yield ChoiceDelta(index, text)
                if ended:
                    break
        self.metrics.generation_tokens.inc(count)
        tail = stream.finish()
        yield ChoiceDelta(index, tail, finish, count)


# ---- response shapes -------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


async def stream_response(serving: Serving, prepared: Prepared) -> AsyncGenerator[bytes, None]:
    chat = prepared.chat
    rid = response_id(chat)
    created = int(time.time())
    model = serving.model_name
    include_usage = prepared.request.include_usage
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict[str, object]) -> bytes:
        body = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }
        return _sse(body)

    completion_tokens = 0
    try:
        if chat:
            total = len(prepared.prompts) * prepared.request.sampling.n
            for index in range(total):
                role = {"role": "assistant", "content": ""}
                yield chunk({"index": index, "delta": role, "logprobs": None, "finish_reason": None})
        async with aclosing(serving.choices(prepared)) as deltas:
            async for d in deltas:
                completion_tokens += d.completion_tokens
                if not d.text and d.finish_reason is None:
                    continue
                if chat:
                    delta: dict[str, object] = {"content": d.text} if d.text else {}
                    choice = {
                        "index": d.index,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": d.finish_reason,
                    }
                else:
                    choice = {
                        "index": d.index,
                        "text": d.text,
                        "logprobs": None,
                        "finish_reason": d.finish_reason,
                    }
                yield chunk(choice)
        if include_usage:
            yield _sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(prepared.prompt_tokens, completion_tokens),
                }
            )
        yield b"data: [DONE]\n\n"
    except EngineError as exc:
        # Headers are gone already: the error travels in-band, then the stream ends cleanly.
        yield exc.sse()


async def full_response(serving: Serving, prepared: Prepared) -> dict[str, object]:
    total = len(prepared.prompts) * prepared.request.sampling.n
    texts = [""] * total
    finish: list[str | None] = [None] * total
    completion_tokens = 0
    async with aclosing(serving.choices(prepared)) as deltas:
        async for d in deltas:
            texts[d.index] += d.text
            if d.finish_reason is not None:
                finish[d.index] = d.finish_reason
                completion_tokens += d.completion_tokens
    usage = _usage(prepared.prompt_tokens, completion_tokens)
    created = int(time.time())
    if prepared.chat:
        return {
            "id": response_id(True),
            "object": "chat.completion",
            "created": created,
            "model": serving.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None,
                    "finish_reason": finish[i],
                }
                for i in range(total)
            ],
            "usage": usage,
        }
    return {
        "id": response_id(False),
        "object": "text_completion",
        "created": created,
        "model": serving.model_name,
        "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]} for i in range(total)],
        "usage": usage,
    }
