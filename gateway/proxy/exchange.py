"""One owner of a request's life: admission -> engine -> relay -> accounting.

    async with Exchange(gw, principal, request, request_id, receive) as ex:
        await ex.admit()                 # key and quota: reserve
        response = await ex.call_engine()  # an engine slot (queued while all are full), send;
                                           # retried once elsewhere before any byte
        await ex.relay(response, send)   # whole or streamed

The exchange is entered once and exited exactly once, whatever the ending: answered, refused,
failed upstream, or the client gone. `__aexit__` is the one place that closes the upstream
response, reconciles the quota (if the relay has not already, just before the final bytes) and
records the metrics; it frees the engine slot (gateway/dispatch/scheduler.py) unless the engine finishing
its answer has freed it already. While it runs, the client is watched: a disconnect
cancels the work at once, which closes the upstream request, which aborts it in the engine.

A batch line (gateway/batch/) runs through the same exchange with no client: `receive=None`
(nothing to watch) and a `send` that collects the response in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

import orjson
from starlette.types import Receive, Send

from gateway.access.base import Grant, Principal, Usage
from gateway.apis.base import Translation
from gateway.cache.service import Lookup
from gateway.core.errors import Code, GatewayError, internal_error
from gateway.core.request import ApiRequest, ClientDisconnected, ClientWatch
from gateway.dispatch.routing import Pick
from gateway.engines.client import EngineUnreachable, UpstreamError, UpstreamResponse
from gateway.engines.pool import Engine
from gateway.monitor.payloads import Capture
from gateway.monitor.writer import LogEntry
from gateway.observe.observer import current
from gateway.proxy.context import Gateway
from gateway.proxy.prompt_bound import bound_prompt
from gateway.proxy.relay import SSE_HEADERS, Outcome, broken, error_of, read_whole, relay_stream, send_last
from gateway.proxy.resume import Splice, Transcript, continuation, read_transcript
from gateway.proxy.translated import JSON, read_translated_whole, relay_translated_stream

log = logging.getLogger(__name__)

DISCONNECTED = 499  # nginx's code for a client that went away; never sent, only recorded
MAX_RESUMES = 2  # a stream goes on on another engine at most this often
# What makes a model hand a request to its fallbacks: it cannot serve it now.
FALLBACK_ON = frozenset(
    {Code.NO_HEALTHY_ENGINE, Code.ENGINES_OVERLOADED, Code.UPSTREAM_ERROR, Code.QUEUE_TIMEOUT, Code.QUEUE_FULL}
)


class Exchange:
    __slots__ = (
        "_body",
        "_capture",
        "_lora",
        "_pending",
        "_settled",
        "_slot",
        "_watch",
        "cache",
        "fallback_from",
        "grant",
        "gw",
        "obs",
        "out",
        "pick",
        "principal",
        "request",
        "request_id",
        "response",
        "started",
        "translation",
    )

    def __init__(
        self,
        gw: Gateway,
        principal: Principal,
        request: ApiRequest,
        request_id: bytes,
        receive: Receive | None,
        translation: Translation | None = None,
    ) -> None:
        self.gw = gw
        self.translation = translation  # the Responses or Messages API over chat (gateway/apis/)
        self.principal = principal
        self.request = request
        if request.subject is None:
            request.subject = principal.key_id  # sticky routing: the user, else the API key
        self.request_id = request_id
        self.out = Outcome()
        self.grant: Grant | None = None
        self.pick: Pick | None = None
        self.response: UpstreamResponse | None = None
        self.started = 0.0
        self._slot: Engine | None = None  # the engine whose slot this request holds
        self._lora: tuple[Engine, str] | None = None  # the adapter this request keeps loaded there
        self._settled: Usage | None = None
        self._capture: Capture | None = None
        self._body: tuple[str, bytes] | None = None  # (upstream model, the engine body)
        self._pending: UpstreamResponse | None = None  # sent, its answer's head not in yet
        self.fallback_from: str | None = None  # the model asked for, when a fallback served
        self.cache: Lookup | None = None  # the response cache was consulted (gateway/cache/)
        self._watch = ClientWatch()
        self._watch.start(receive)
        # What the access log and the trace learn of this request (gateway/observe/); None when off.
        self.obs = obs = current() if gw.observe is not None else None
        if obs is not None:
            obs.note_request(principal.key_id, principal.key, principal.priority, request)

    async def __aenter__(self) -> Exchange:
        self.started = time.perf_counter()
        self.gw.metrics.in_flight.inc()
        self.gw.drain.live.add(self)
        return self

    def cut(self, error: GatewayError) -> None:
        """The gateway is shutting down and this request outlived the drain (gateway/proxy/drain.py): a
        stream being relayed ends in-band like any broken stream (its upstream is closed; the relay
        sends `error` and [DONE]); a request not answered yet is cancelled and answered `error`."""
        if self.out.done or self.out.cut is not None:
            return
        self.out.cut = error
        if self.request.stream and self.out.status == 200 and self.response is not None:
            self.response.close()
        else:
            self._watch.interrupt()

    async def admit(self) -> None:
        limit = self.gw.models[self.request.model].max_prompt_tokens
        if limit is not None:  # before the quota: a refused prompt reserves nothing
            await bound_prompt(self.gw.counter, self.request, limit)
        obs = self.obs
        if obs is not None:
            obs.admit_start = time.perf_counter()
        self.grant = await self.gw.access.admit(self.principal, self.request)
        if obs is not None:
            obs.note_admitted(self.grant.headers)

    async def from_cache(self, lookup: Lookup, send: Send) -> bool:
        """Answers from the response cache when it holds the answer (False: a miss; the relay
        then keeps the engine's answer for next time). A hit is settled as cached."""
        self.cache = lookup
        assert self.gw.cache is not None
        replay = await self.gw.cache.answer(lookup, self.request)
        if replay is None:
            return False
        out = self.out
        out.status, out.usage, out.finish_reason, out.done = 200, replay.usage, replay.finish_reason, True
        self._watch.stop()
        grant = self.grant
        if grant is not None:
            grant.route = "cache"  # spend rows by route show the hits apart
        self._settled = await self.gw.access.settle(grant, replay.charged) if grant else replay.charged
        headers = [(b"content-type", replay.content_type), *self._headers()]
        if self.request.stream:
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"content-length", b"%d" % len(replay.body)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": replay.body})
        return True

    async def call_engine(self) -> UpstreamResponse:
        """Sends the request to an engine of its model, else of its fallbacks (the model's
        `fallbacks`, in order, those the key may use) when the model cannot serve it: no healthy
        engine, every engine refused or failed before answering, or the queue too long (its
        `fallback_after`, or the scheduler's own bounds). What served is the request's model
        from then on: the metrics, the log and `x-gateway-model` say so."""
        request, gw = self.request, self.gw
        asked = request.model
        settings = gw.models[asked]
        try:
            return await self._call_model(settings.fallback_after if settings.fallbacks else None)
        except GatewayError as exc:
            if exc.code not in FALLBACK_ON or not settings.fallbacks:
                raise
            error = exc
        for fallback in settings.fallbacks:
            if not self.principal.may_use(fallback) or not gw.router.knows(fallback):
                continue
            request.model = fallback
            self._body = None
            try:
                response = await self._call_model(None)
            except GatewayError as exc:
                if exc.code not in FALLBACK_ON:
                    raise
                continue
            gw.metrics.fallbacks_by[asked, fallback].inc()
            self.fallback_from = asked
            return response
        request.model = asked
        raise error

    async def _call_model(self, wait_limit: float | None, tried: set[str] | None = None) -> UpstreamResponse:
        """One model's engines: an engine slot (queued while all are full, at most `wait_limit`
        seconds when given), then the call; one that refuses or fails before answering is retried
        once on another engine (nothing has reached the client yet)."""
        gw, request, m = self.gw, self.request, self.gw.metrics
        model = request.model
        if model in gw.control.stopped_models:  # scale to zero: traffic starts the model's stopped engines
            gw.control.wake_model(model)
        tried = tried if tried is not None else set()
        error: GatewayError | None = None
        for attempt in range(2):
            if attempt:
                pick = gw.scheduler.retry(request, frozenset(tried))
            else:  # an engine slot: at once when one has room, else in turn (gateway/dispatch/scheduler.py)
                if self.obs is not None:
                    self.obs.note_queue(gw.scheduler.waiting())
                pick = await self._acquire(wait_limit)
                if pick is None and await gw.control.wait_for(model):  # a cold start, shared by all waiting
                    if self.obs is not None:
                        self.obs.cold_start = (self.obs.queue_start, time.perf_counter())
                    pick = await self._acquire(wait_limit)
                if self.obs is not None:
                    self.obs.queue_end = time.perf_counter()
            if pick is None:
                break
            self._use(pick)
            engine = pick.engine
            tried.add(engine.name)
            if pick.route.adapter is not None:  # a LoRA adapter: loaded there first if need be
                await self._hold_adapter(engine, pick.route.adapter)
            if attempt:
                m.retries_by[model].inc()
            m.routing_by[model, engine.name].inc()
            if self.translation is None:
                path, body = request.endpoint.path, self._engine_body(pick.route.model)
            else:  # native where the engine serves the API itself, else as chat completions
                native = self.translation.api in engine.settings.apis
                path, body = self.translation.upstream(native, pick.route.model)
            head = (
                self.obs.note_upstream(pick.route.name, engine.name, pick.route.model, pick.scores) if self.obs else b""
            )
            try:
                response = await gw.upstream.post(
                    engine.settings, path, body, request.stream, head, request.content_type, self._sent
                )
            except EngineUnreachable as exc:
                m.upstream_errors_by[engine.name, "connect"].inc()
                gw.pool.request_failed(engine, "refused")
                gw.pool.mark_failed(engine, str(exc))
                error = GatewayError(503, "No engine could take the request.", code=Code.NO_HEALTHY_ENGINE)
                continue
            except TimeoutError:
                self._pending = None
                m.upstream_errors_by[engine.name, "timeout"].inc()
                gw.pool.request_failed(engine, "no first byte in time")
                raise GatewayError(504, "The engine did not answer in time.", code=Code.UPSTREAM_TIMEOUT) from None
            except UpstreamError as exc:
                self._pending = None
                m.upstream_errors_by[engine.name, "read"].inc()
                gw.pool.request_failed(engine, "the connection broke before the answer")
                error = GatewayError(502, f"The engine failed: {exc}.", code=Code.UPSTREAM_ERROR)
                continue
            if response.status == 429 or response.status >= 500:
                if response.status == 429:
                    m.upstream_errors_by[engine.name, "overloaded"].inc()
                    gw.pool.request_answered(engine)  # busy, not broken
                else:
                    m.upstream_errors_by[engine.name, "5xx"].inc()
                    gw.pool.request_failed(engine, f"status {response.status}")
                error = await error_of(response)
                response.release()
                continue
            self._pending = None
            gw.pool.request_answered(engine)
            self.response = response
            if self.obs is not None:
                self.obs.upstream_headers = time.perf_counter()
            return response
        raise error or GatewayError(503, f"No healthy engine serves '{model}' right now.", code=Code.NO_HEALTHY_ENGINE)

    async def _acquire(self, wait_limit: float | None) -> Pick | None:
        scheduler = self.gw.scheduler
        if wait_limit is None:
            return await scheduler.acquire(self.request, self.principal, self.grant)
        try:
            async with asyncio.timeout(wait_limit):
                return await scheduler.acquire(self.request, self.principal, self.grant)
        except TimeoutError:
            raise GatewayError(
                429, f"Every engine of '{self.request.model}' is busy.", code=Code.QUEUE_TIMEOUT
            ) from None

    def _engine_body(self, upstream_model: str) -> bytes:
        """The body sent to the engine: the client's, with the route's model name and, for a
        stream, the usage asked for (accounting is exact; the relay strips it again if unwanted).
        Built once per upstream model, so a retry on the same route reuses it."""
        if self._body is not None and self._body[0] == upstream_model:
            return self._body[1]
        request = self.request
        if request.rewrite is not None:  # a passed-through upload: its own encoding
            encoded = request.rewrite(upstream_model)
            self._body = (upstream_model, encoded)
            return encoded
        body = request.body
        body["model"] = upstream_model
        if request.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**options, "include_usage": True} if options else {"include_usage": True}
        encoded = orjson.dumps(body)
        self._body = (upstream_model, encoded)
        return encoded

    def _use(self, pick: Pick) -> None:
        """Holds the pick's engine slot (taken by the scheduler); frees the one held before."""
        self._free_slot()
        self.pick = pick
        engine = self._slot = pick.engine
        engine.picks += 1  # traffic: the supervisor's idle timer (scale to zero) reads it
        engine.inflight.add(self)  # told if the pool takes the engine out (engine_out)

    def _free_slot(self) -> None:
        """Gives the engine slot back (once): the scheduler may hand it to a waiting request."""
        engine, self._slot = self._slot, None
        if engine is not None:
            engine.inflight.discard(self)
            self.gw.scheduler.release(engine)
        if self._lora is not None and self.gw.adapters is not None:  # the adapter may be unloaded now
            self.gw.adapters.placement.done(*self._lora)
            self._lora = None

    async def _hold_adapter(self, engine: Engine, adapter: str) -> None:
        assert self.gw.adapters is not None
        await self.gw.adapters.placement.ensure(engine, adapter)
        self._lora = (engine, adapter)

    def _sent(self, response: UpstreamResponse) -> None:
        self._pending = response

    def engine_out(self, engine: Engine, why: str) -> None:
        """The pool took this request's engine out (its health check failed, its breaker opened):
        it moves now, by closing its upstream, rather than when a hung engine's socket finally
        breaks. One still waiting for its answer's head is sent to another engine (as after a
        refusal); an answer being relayed goes on on another engine of its route (the relay sees
        it broken and resumes it). With nowhere to go it stays, for as long as it lasts."""
        pick, out = self.pick, self.out
        if pick is None or pick.engine is not engine or out.done or out.cut is not None or out.error is not None:
            return  # (an error: the relay saw it broken already, and is moving it)
        response = self._pending
        if response is None and (response := self.response) is not None and not self._resumes():
            return
        if response is None or not any(e.healthy for e in self.gw.router.members(pick.route) if e is not engine):
            return
        log.info("request %s: leaving engine %s: %s", self.request_id.decode(), engine.name, why)
        response.close()

    async def relay(self, response: UpstreamResponse, send: Send) -> None:
        gw = self.gw
        headers = self._headers()
        inference_log = gw.inference_log
        if inference_log is not None and (capture := inference_log.capture(self.request)) is not None:
            self._capture, send = capture, capture.wrap(send)  # a sampled payload: keep what is sent
        if self.cache is not None and gw.cache is not None:  # a cache miss: keep the answer
            send = self.cache.record(send, 4 * gw.cache.settings.max_entry_bytes)
        if self.translation is not None:
            await self._relay_translated(response, send, headers)
            return
        if not (self.request.stream and response.status == 200):
            try:
                content = await read_whole(response, self.out)
            except GatewayError as exc:
                failed = self.pick.engine if self.pick is not None else None
                if exc.code != Code.UPSTREAM_ERROR or failed is None or not self._resumes():
                    raise
                # The engine failed while answering: nothing reached the client, so another engine
                # answers the whole request again.
                if failed.healthy:  # else it was taken out, and this answer moved (engine_out)
                    gw.pool.request_failed(failed, "an answer broke")
                    gw.pool.mark_failed(failed, f"an answer broke: {exc.message}")
                gw.metrics.upstream_errors_by[failed.name, "mid_answer"].inc()
                response.close()
                response = await self._call_model(None, {failed.name})
                content = await read_whole(response, self.out)
            await self._finishing()
            ctype = response.header(b"content-type") or b"application/json"
            start = {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", ctype), *headers],
            }
            await send(start)
            await send({"type": "http.response.body", "body": content})
            return
        m = gw.metrics
        m.streams.inc()
        gw.watchdog.watch(self.out, self._watch.drop)
        out = self.out
        try:
            strip = not self.request.usage_wanted
            on_gap = m.itl_by[self.request.model, self.pick.route.name if self.pick else "-"].observe
            await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
            out.status = 200
            kept = Transcript() if self._resumes() else None
            tail = await relay_stream(response, send, out, strip, on_gap, kept)
            while tail is None and kept is not None and out.cut is None and out.resumed < MAX_RESUMES:
                resumed = await self._resume(kept)
                if resumed is None:
                    break
                response, splice = resumed
                tail = await relay_stream(response, send, out, strip, on_gap, kept, splice)
            if tail is None:
                tail = broken(out)
            await self._finishing()
            await send_last(send, out, tail)
        finally:
            gw.watchdog.unwatch(out)
            m.streams.dec()

    async def _resume(self, kept: Transcript) -> tuple[UpstreamResponse, Splice] | None:
        """The stream's engine failed after the first byte: the same request goes on from what was
        sent, on another engine of the same route (gateway/proxy/resume.py). None when it cannot."""
        gw, request, out = self.gw, self.request, self.out
        m, model = gw.metrics, request.model
        failed, route = self.pick.engine if self.pick else None, self.pick.route if self.pick else None
        if failed is None or route is None:
            return None
        m.upstream_errors_by[failed.name, "mid_stream"].inc()
        if out.error != "the engine sent an error event" and failed.healthy:  # else it moved (engine_out)
            gw.pool.request_failed(failed, "a stream broke")
            gw.pool.mark_failed(failed, f"a stream broke: {out.error}")  # its other streams move too
        so_far = read_transcript(kept.blocks, request.endpoint.kind == "chat") if not kept.overflow else None
        if so_far is None or so_far.finish_reason is not None:
            return None  # past its bound; or it had finished but for its [DONE]: ends as broken
        body = continuation(request.body, request.endpoint.kind == "chat", so_far, request.max_tokens)
        if body is None:
            m.resumes_by[model, "not_resumable"].inc()
            return None
        self._free_slot()
        tried = frozenset({failed.name})
        pick = gw.scheduler.retry(request, tried)
        if pick is None and not failed.healthy:
            pick = await gw.scheduler.acquire(request, self.principal, self.grant)
        if pick is not None and (pick.engine.name in tried or pick.route.name != route.name):
            gw.scheduler.release(pick.engine)  # another version of the model must not finish this answer
            pick = None
        if pick is None:
            m.resumes_by[model, "no_engine"].inc()
            return None
        self._use(pick)
        engine = pick.engine
        if route.adapter is not None:
            try:
                await self._hold_adapter(engine, route.adapter)
            except GatewayError:  # the adapter could not be placed there: the stream ends as broken
                m.resumes_by[model, "failed"].inc()
                return None
        body["model"] = route.model
        try:
            response = await gw.upstream.post(engine.settings, request.endpoint.path, orjson.dumps(body), True)
        except (EngineUnreachable, UpstreamError, TimeoutError) as exc:
            gw.pool.request_failed(engine, "a resumed stream could not start")
            gw.pool.mark_failed(engine, f"a resumed stream could not start: {exc}")
            m.resumes_by[model, "failed"].inc()
            return None
        if response.status != 200:
            if response.status >= 500:
                gw.pool.request_failed(engine, f"status {response.status}")
            response.release()
            m.resumes_by[model, "failed"].inc()
            return None
        gw.pool.request_answered(engine)
        if self.response is not None:
            self.response.close()
        self.response = response
        out.error = None
        out.resumed += 1
        m.resumes_by[model, "resumed"].inc()
        log.info("request %s: stream resumed on engine %s after %s", self.request_id.decode(), engine.name, failed.name)
        prompt = request.prompt_tokens  # as counted at admission, when it was
        return response, Splice(so_far, prompt)

    def _resumes(self) -> bool:
        return self.gw.models[self.request.model].failover == "resume"

    async def _relay_translated(
        self, response: UpstreamResponse, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        t, m = self.translation, self.gw.metrics
        assert t is not None
        if not (self.request.stream and response.status == 200):
            body = await read_translated_whole(response, self.out, t)
            await self._finishing()
            if response.status == 200:
                await t.finished()  # a stored answer (Responses) is there before its client has it
            await send({"type": "http.response.start", "status": response.status, "headers": [JSON, *headers]})
            await send({"type": "http.response.body", "body": body})
            return
        m.streams.inc()
        self.gw.watchdog.watch(self.out, self._watch.drop)
        try:
            on_gap = m.itl_by[self.request.model, self.pick.route.name if self.pick else "-"].observe
            tail = await relay_translated_stream(response, send, self.out, headers, t, on_gap)
            await self._finishing()
            if self.out.done:
                await t.finished()
            await send_last(send, self.out, tail)
        finally:
            self.gw.watchdog.unwatch(self.out)
            m.streams.dec()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = list(self.grant.headers) if self.grant is not None else []
        if self.pick is not None:
            headers.append((b"x-gateway-route", self.pick.route.name.encode()))
        if self.fallback_from is not None:  # a fallback served: say which model
            headers.append((b"x-gateway-model", self.request.model.encode()))
        if self.cache is not None:
            headers.append((b"x-gateway-cache", b"hit" if self.cache.hit else b"miss"))
        return headers

    async def _finishing(self) -> None:
        """The last word before the final bytes leave (the server reports a finished response as
        a disconnect, so the watch stops first). The engine is done with the request: its slot
        goes to the next one now, not after the quota round trip and the last send."""
        self._watch.stop()
        self._free_slot()
        await self.settle()

    async def settle(self) -> Usage:
        """Reconciles the quota with what was used. Done once; release is idempotent, so a
        settle cut short by a cancellation is simply run again."""
        if self._settled is None:
            obs = self.obs
            if obs is not None and not obs.settle_start:
                obs.settle_start = time.perf_counter()
            usage = _usage(self.out)
            if self.grant is not None:
                self.grant.route = self.pick.route.name if self.pick is not None else None  # for spend by route
                usage = await self.gw.access.settle(self.grant, usage)
            self._settled = usage
            if obs is not None:
                obs.settle_end = time.perf_counter()
        return self._settled

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._watch.stop()
        self.gw.drain.live.discard(self)
        gone = self._watch.disconnected(exc)
        out = self.out
        cut = out.cut if not gone and self._watch.interrupted(exc) else None
        if cut is not None:
            exc = cut  # our own cancellation (shutdown), answered as the error it stands for
        if gone:
            out.status = DISCONNECTED
        elif isinstance(exc, GatewayError):
            out.status, out.error_code = exc.status, exc.code
        elif exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.error("request %s failed", self.request_id.decode(), exc_info=(kind, exc, tb))  # type: ignore[arg-type]
            out.status, out.error_code = 500, Code.INTERNAL_ERROR
        elif exc is not None:
            out.status = 503  # the server is shutting down and cut the request
        response = self.response
        if response is not None:
            if out.done or (out.status != DISCONNECTED and not self.request.stream):
                response.release()
            else:
                response.close()  # drops the connection: the engine aborts the request
        self._free_slot()  # may dispatch a waiting request
        gw = self.gw
        gw.metrics.in_flight.dec()
        usage = await self.settle()
        self._record(usage)
        if gone:
            raise ClientDisconnected() from None
        if cut is not None:
            raise cut from None
        if exc is not None and not isinstance(exc, GatewayError | asyncio.CancelledError):
            raise internal_error() from exc

    def _record(self, usage: Usage) -> None:
        m = self.gw.metrics
        out, model = self.out, self.request.model
        pick = self.pick
        engine = pick.engine.name if pick is not None else "-"
        route = pick.route.name if pick is not None else "-"
        cache = self.cache
        if cache is not None and self.gw.cache is not None:
            done = out.done if self.request.stream else out.error is None
            self.gw.cache.finish(cache, self.request, out.status, done, out.usage)
            if cache.hit:
                engine = route = "cache"  # the metrics and the inference log say who answered
        status = str(out.status)
        elapsed = time.perf_counter() - self.started
        ttft = out.first_chunk - self.started if out.first_chunk else None
        api = self.request.endpoint.kind
        m.requests_by[model, engine, status, route, api].inc()
        obs = self.obs
        trace_id = obs.exemplar() if obs is not None else None
        if trace_id is None:
            m.latency_by[model, route, api].observe(elapsed)
            if ttft is not None:
                m.ttft_by[model, route].observe(ttft)
        else:  # a sampled trace: its id goes with the observations (exemplars)
            m.observe(m.latency_by, (model, route, api), elapsed, trace_id)
            if ttft is not None:
                m.observe(m.ttft_by, (model, route), ttft, trace_id)
        if usage.prompt_tokens:
            m.prompt_tokens_by[model, route].inc(usage.prompt_tokens)
        if usage.completion_tokens:
            m.completion_tokens_by[model, route].inc(usage.completion_tokens)
        if self.principal.key_id is not None:
            m.key_requests_by[self.principal.key_id, status].inc()
        if obs is not None:
            obs.note_outcome(out.status, out.error_code, usage, ttft, out.finish_reason, out.status == DISCONNECTED)
        if out.status == DISCONNECTED:
            m.disconnects_by[model].inc()
        elif out.error is not None:
            m.upstream_errors_by[engine, "mid_stream"].inc()
        inference_log = self.gw.inference_log
        if inference_log is not None:
            inference_log.add(
                LogEntry(
                    time.time() - elapsed,
                    self.request_id,
                    self.principal.key_id,
                    model,
                    route if pick is not None or engine == "cache" else None,
                    engine if pick is not None or engine == "cache" else None,
                    out.status,
                    out.error_code,
                    self.request.stream,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    ttft,
                    elapsed,
                    out.finish_reason,
                    out.status == DISCONNECTED,
                    self.request.batch_id,
                    self._capture,
                    api,
                )
            )


def _usage(out: Outcome) -> Usage:
    """The engine's usage when it reported one; otherwise every relayed event counts as a token."""
    reported = out.usage
    if reported is not None:
        try:
            details = reported.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            prompt, completion = int(reported.get("prompt_tokens") or 0), int(reported.get("completion_tokens") or 0)
            return Usage(prompt, completion, True, cached)
        except (TypeError, ValueError):
            pass
    return Usage(0, max(0, out.events), exact=False)
