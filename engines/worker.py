"""The engine worker: one model behind the OpenAI HTTP protocol that vLLM's server also speaks.

llm-engine --model engines/tiny_model/tiny-llama --port 8001
llm-engine --model all-MiniLM-L6-v2 --port 8002        # embeddings
llm-engine --enable-lora --lora-dir /srv/adapters --lora-modules code=engines/tiny_model/adapters/python-code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engines import protocol
from engines.engine import EngineStats
from engines.errors import EngineError
from engines.http import (
    ClientDisconnected,
    on_engine_error,
    on_http_error,
    on_unexpected,
    read_body,
    unless_disconnected,
)
from engines.lora import AdapterLoadError, Lease
from engines.lora import card as lora_card
from engines.lora_api import LoraApi
from engines.lora_api import routes as lora_routes
from engines.metrics import WorkerMetrics
from engines.serving import Serving, full_response, stream_response

log = logging.getLogger("engines.worker")

TINY_MODEL = Path(__file__).parent / "tiny_model" / "tiny-llama"
DEFAULT_MAX_BODY = 4 * 1024 * 1024


@dataclass
class WorkerState:
    model_name: str
    metrics: WorkerMetrics
    max_body_bytes: int
    serving: Serving | None = None  # a generation model
    embedder: Any = None  # an EmbeddingEngine
    created: int = 0
    lora: LoraApi | None = None  # with --enable-lora
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # loaded at start

    async def lease(self, model: str) -> Lease:
        """The serving for `model` (the base model or a LoRA adapter), held until released."""
        assert self.serving is not None
        if model == self.model_name:
            return Lease(self.serving, _nothing)
        if self.lora is not None and model in self.lora.adapters:
            try:
                return await self.lora.adapters.acquire(model)
            except KeyError:  # unloaded while it was being loaded again
                pass
            except AdapterLoadError as exc:
                raise EngineError(
                    400, f"The LoRA adapter '{model}' could not be loaded: {exc}", param="model"
                ) from None
        raise protocol.model_not_found(model)


def _nothing() -> None:
    pass


def build_app(state: WorkerState, engine: Any = None) -> Starlette:
    """`engine` is started and stopped with the app (the CpuEngine; None for embeddings)."""

    async def parse(request: Request) -> dict[str, Any]:
        body = protocol.parse_json(await read_body(request, state.max_body_bytes))
        return body

    def check_model(model: str) -> None:
        if model != state.model_name:
            raise protocol.model_not_found(model)

    async def generate(request: Request, chat: bool) -> Response:
        if state.serving is None:
            raise EngineError(404, f"The model '{state.model_name}' does not generate text.", param="model")
        endpoint = "chat" if chat else "completions"
        body = await parse(request)
        parsed = protocol.parse_chat(body) if chat else protocol.parse_completion(body)
        lease = await state.lease(parsed.model)
        try:
            prepared = await lease.serving.prepare(parsed)  # a full queue is a 429 here, before any byte
        except BaseException:
            lease.release()
            raise
        if parsed.stream:
            state.metrics.requests.labels(endpoint, "stream").inc()

            def release() -> None:
                prepared.slots.release()
                lease.release()

            return _EngineStream(
                _count_abort(stream_response(lease.serving, prepared), state.metrics),
                release,
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        try:
            result = await unless_disconnected(request, full_response(lease.serving, prepared))
        except ClientDisconnected:
            state.metrics.aborted.inc()
            return Response(status_code=499)
        finally:
            prepared.slots.release()
            lease.release()
        state.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(result)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def embeddings(request: Request) -> Response:
        if state.embedder is None:
            raise EngineError(404, f"The model '{state.model_name}' does not serve embeddings.", param="model")
        parsed = protocol.parse_embedding(await parse(request))
        check_model(parsed.model)
        vectors, tokens = await state.embedder.embed(parsed.inputs)
        state.metrics.prompt_tokens.inc(tokens)
        state.metrics.requests.labels("embeddings", "200").inc()
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, parsed.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": state.model_name, "usage": usage})

    async def models(request: Request) -> Response:
        card: dict[str, Any] = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llm-gateway",
        }
        if state.serving is not None:
            card["max_model_len"] = state.serving.engine.context_length
        cards = [card]
        if state.lora is not None:
            cards += [lora_card(a, state.model_name, state.created) for a in state.lora.adapters.registered()]
        return JSONResponse({"object": "list", "data": cards})

    async def health(request: Request) -> Response:
        # Answered on the event loop without touching the compute (which runs on other threads),
        # so a busy engine still answers at once.
        problem = None if engine is None else engine.health()
        if problem is None and state.lora is not None:
            problem = state.lora.adapters.health()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        if engine is not None:
            engine.start()
            state.metrics.watch(lambda: _all_stats(engine, state.lora))
        try:
            if state.lora is not None:
                for name, path in state.lora_modules:  # the operator's own: exempt from --lora-dir
                    await state.lora.load(name, path, trusted=True)
            yield
        finally:
            if state.lora is not None:
                state.lora.adapters.stop()
            if state.serving is not None:
                await state.serving.aclose()
            if engine is not None:
                engine.stop()

    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in lora_routes(state.lora).items()),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {EngineError: on_engine_error, HTTPException: on_http_error, Exception: on_unexpected}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


class _EngineStream(StreamingResponse):
    """A stream that gives back its unused queue places however it ends, even when the client
    left before the first chunk (then the body generator never starts, so it cannot)."""

    def __init__(self, content: AsyncGenerator[bytes, None], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _count_abort(chunks: AsyncGenerator[bytes, None], metrics: WorkerMetrics) -> AsyncGenerator[bytes, None]:
    finished = False
    try:
        async for chunk in chunks:
            yield chunk
        finished = True
    finally:
        if not finished:
            metrics.aborted.inc()
        await chunks.aclose()


def _all_stats(engine: Any, lora: LoraApi | None) -> EngineStats:
    """The base engine's load plus its resident adapters' (each has a batch and a KV cache)."""
    stats = [engine.stats(), *(lora.adapters.stats() if lora is not None else [])]
    return EngineStats(
        running=sum(s.running for s in stats),
        waiting=sum(s.waiting for s in stats),
        kv_blocks_used=sum(s.kv_blocks_used for s in stats),
        kv_blocks_total=sum(s.kv_blocks_total for s in stats),
    )


def _encode(vector: list[float], encoding_format: str) -> Any:
    if encoding_format == "base64":
        import base64
        import struct

        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-engine", description="OpenAI-compatible CPU engine worker.")
    p.add_argument("--model", default=str(TINY_MODEL), help="model directory, or all-MiniLM-L6-v2")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--num-blocks", type=int, default=256, help="KV cache blocks (bounds KV memory)")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV block")
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=15.0,
        help="/health answers 503 when the generation loop makes no progress this long with work pending",
    )
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    lora = p.add_argument_group("LoRA adapters (vLLM's flags and API)")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters of the model")
    lora.add_argument("--max-loras", type=int, default=1, help="adapters resident at once (each a model copy)")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help="adapters loaded at start")
    lora.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        type=Path,
        help="a directory POST /v1/load_lora_adapter may load adapters from (repeatable; default: none)",
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _lora_module(spec: str) -> tuple[str, str]:
    """`name=path`, or vLLM's JSON form {"name": ..., "path": ...}."""
    if spec.startswith("{"):
        item = json.loads(spec)
        return str(item["name"]), str(item["path"])
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--lora-modules: expected NAME=PATH, got {spec!r}")
    return name, path


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from engines.embeddings import DEFAULT_EMBEDDING_MODEL

    args = parse_args(argv)
    if (args.lora_modules or args.lora_dir) and not args.enable_lora:
        raise SystemExit("--lora-modules and --lora-dir need --enable-lora")
    if args.max_loras < 1:
        raise SystemExit("--max-loras must be at least 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: weights are local
    metrics = WorkerMetrics()
    engine = None
    if args.model == DEFAULT_EMBEDDING_MODEL:
        from engines.embeddings import EmbeddingEngine, bundled_minilm_path

        state = WorkerState(args.served_model_name or args.model, metrics, args.max_body_bytes)
        state.embedder = EmbeddingEngine(bundled_minilm_path())
    else:
        from engines.cpu import CpuEngine, CpuEngineConfig
        from engines.lora import LoraAdapters

        path = Path(args.model)
        engine = CpuEngine(
            CpuEngineConfig(
                model_path=path,
                num_blocks=args.num_blocks,
                page_size=args.page_size,
                max_batch_tokens=args.max_batch_tokens,
                max_waiting=args.max_waiting,
                max_model_len=args.max_model_len,
                threads=args.threads,
                stall_seconds=args.stall_seconds,
            )
        )
        state = WorkerState(args.served_model_name or path.name, metrics, args.max_body_bytes)
        state.serving = Serving(engine, state.model_name, metrics)
        if args.enable_lora:
            adapters = LoraAdapters(engine, state.model_name, metrics, state.serving.prompts, args.max_loras)
            state.lora = LoraApi(adapters, args.lora_dir)
            state.lora_modules = [_lora_module(m) for m in args.lora_modules]
    state.created = int(time.time())
    log.info("serving %s on http://%s:%d", state.model_name, args.host, args.port)
    uvicorn.run(
        build_app(state, engine),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
