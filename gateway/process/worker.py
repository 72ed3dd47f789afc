"""One worker process of the gateway: the app on our HTTP/1.1 server, with the graceful drain.

The main process (gateway/process/main.py) binds the listeners once and starts N of these with the
sockets (`run_worker`); each serves both the public and the admin listener (gateway/front/listeners.py)
with one app and one lifespan, over gateway/front/http11.py (header, body, keep-alive and
connection limits) and, with `server.tls`, HTTPS.

The first SIGTERM or Ctrl-C starts the drain of gateway/proxy/drain.py (a plain server would stop
accepting at once and cut whatever runs past a fixed grace, mid-stream, without a word); a second
Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvloop
from starlette.types import ASGIApp, Message

from gateway.core.text import SafeFormatter
from gateway.front.http11 import HttpConnection, ServerState
from gateway.process import lifeline
from gateway.proxy.drain import Drain
from gateway.settings import ServerSettings, Settings
from gateway.settings.source import ConfigSource

if TYPE_CHECKING:  # the app's modules load in the worker process only
    from gateway.front.running import Version

log = logging.getLogger(__name__)

CUT_WAIT = 5.0  # after the drain timeout: how long cut requests get to end and reconcile
STARTUP_FAILURE = 3  # the exit code of a worker that could not start
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Every line with a timestamp and a level, in every process; libraries' chatter only when debugging."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter(LOG_FORMAT))  # client text never breaks or forges a line
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    quiet = max(numeric, logging.WARNING) if numeric > logging.DEBUG else numeric
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it by multiprocessing's spawn)."""

    settings: Settings
    index: int
    log_level: str = "info"
    control_path: str | None = None
    metrics_hub: str | None = None  # with several workers: gateway/process/metrics_hub.py
    source: ConfigSource | None = None  # where a reload reads the configuration again
    version: str = ""  # of `settings` (gateway/settings/source.py)
    replica: str | None = None  # this replica's name in reload announcements, the same in all its workers


class Lifespan:
    """The app's ASGI lifespan: startup before the listeners open, shutdown after the drain."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self._app = app
        self._state = state
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failed = False

    async def startup(self) -> bool:
        self._task = asyncio.create_task(self._run(), name="lifespan")
        await self._inbox.put({"type": "lifespan.startup"})
        await self._started.wait()
        return not self.failed

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._stopped.wait()

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self._state}
        try:
            await self._app(scope, self._inbox.get, self._send)
        except asyncio.CancelledError:
            # The process stops at once (its main process is gone, or a second signal): no error
            # of the app's; what the shutdown would have flushed is cut, and that is said once.
            self.failed = not self._started.is_set()
            log.warning("the gateway's shutdown was cut short: the process is stopping at once")
            raise
        except BaseException as exc:
            if not self._started.is_set():
                self.failed = True
                log.error("the gateway could not start", exc_info=exc)
            else:
                log.error("the gateway's shutdown failed", exc_info=exc)
        finally:
            self._started.set()
            self._stopped.set()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.failed":
            self.failed = True
            log.error("the gateway could not start: %s", message.get("message", ""))
        if kind.startswith("lifespan.startup."):
            self._started.set()
        elif kind.startswith("lifespan.shutdown."):
            self._stopped.set()


class GatewayServer:
    def __init__(self, app: ASGIApp, drain: Drain, settings: ServerSettings) -> None:
        self.app = app  # runs the lifespan; requests go to `state.app` (a reload changes it: `follow`)
        self.state = ServerState(app, settings, drain, "https" if settings.tls else "http")
        self.drain = drain
        self.settings = settings
        self._tls: ssl.SSLContext | None = None
        self.started = False
        self.force_exit = False
        self._exit = False
        self._servers: list[asyncio.Server] = []
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._announced = False

    def run(self, sockets: list[socket.socket]) -> None:
        uvloop.run(self.serve(sockets))

    def exit(self) -> None:
        """Stops at once, without the drain (tests and benchmarks that run the server in-process)."""
        self._exit = True
        if self._wake is not None:
            self._wake.set()

    def handle_exit(self, sig: int) -> None:
        if self.drain.draining:
            if sig == signal.SIGINT:
                self.force_exit = True
                self.exit()
            return
        self.drain.begin(0.0 if sig == signal.SIGINT else self.settings.drain_grace)
        if self._wake is not None:
            self._wake.set()

    async def serve(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        lifespan = Lifespan(self.app, self.state.lifespan_state)
        if not await lifespan.startup():
            return
        tls = self._tls = self._tls_context()
        state = self.state
        for sock in sockets:
            server = await loop.create_server(lambda: HttpConnection(state), sock=sock, ssl=tls, backlog=4096)
            self._servers.append(server)
        self.started = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        try:
            await self._until_done()
            await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if not self.force_exit:
            await lifespan.shutdown()

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        return context

    def follow(self, version: Version) -> None:
        """A reload swapped the configuration: new requests go to its app, new connections get
        its limits and, when its certificate files changed, its certificate (the listeners keep
        their TLS context: it is loaded anew in place)."""
        settings = version.gw.settings.server
        self.state.app = version.front
        self.state.settings = self.settings = settings
        tls = settings.tls
        if self._tls is None or tls is None:
            return
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
            self._tls.load_cert_chain(tls.cert, tls.key)  # only once the pair is known to load
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "server.tls: cannot load %s and %s (%s); connections keep the previous certificate",
                tls.cert,
                tls.key,
                exc,
            )

    async def _until_done(self) -> None:
        assert self._wake is not None
        while not self._exit:
            if not self.drain.draining:
                await self._wake.wait()
                self._wake.clear()
                continue
            if self._drain_step():
                return
            await asyncio.sleep(0.1)

    def _drain_step(self) -> bool:
        """One look at the drain's timeline (the module docstring of gateway/proxy/drain.py); True when done."""
        drain = self.drain
        if not self._announced:
            self._announced = True
            log.info(
                "draining: %d request(s) in flight; new connections until %.3gs, in-flight work until %.3gs",
                drain.in_flight,
                drain.grace,
                self.settings.drain_timeout,
            )
            self._shutdown_connections()
        elapsed = drain.elapsed()
        if not self._closed and elapsed >= drain.grace:
            self._close_listeners()
        if self._closed and not self.state.tasks:
            return True
        return elapsed >= self.settings.drain_timeout

    async def _shutdown(self) -> None:
        self._close_listeners()
        tasks = self.state.tasks
        if tasks and not self.force_exit:
            cut = self.drain.cut_all()
            log.warning("drain timeout: %d request(s) still in flight were ended (503 or an SSE error)", cut)
            await self._wait_tasks(CUT_WAIT)
        if tasks:
            log.warning("cancelling %d request task(s) that did not end", len(tasks))
            for task in list(tasks):
                task.cancel()
            await self._wait_tasks(1.0)
        for connection in list(self.state.connections):
            connection.transport.close()
        for server in self._servers:
            try:
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
            except TimeoutError:
                pass

    def _close_listeners(self) -> None:
        if not self._closed:
            self._closed = True
            for server in self._servers:
                server.close()
            self._shutdown_connections()  # also those accepted during the grace period

    def _shutdown_connections(self) -> None:
        # Idle keep-alive connections close now; busy ones after their response.
        for connection in list(self.state.connections):
            connection.shutdown()

    async def _wait_tasks(self, seconds: float) -> None:
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=seconds)


def build_server(spec: WorkerSpec) -> GatewayServer:
    from gateway.front.app import build_app

    settings = spec.settings
    drain = Drain()
    running = build_app(
        settings,
        metrics_hub=spec.metrics_hub,
        drain=drain,
        control_path=spec.control_path,
        source=spec.source,
        version=spec.version,
        replica=spec.replica,
    )
    server = GatewayServer(running, drain, settings.server)
    server.state.app = running.current.front  # per request: the configuration's own app, no hop
    running.on_swap.append(server.follow)
    return server


def run_worker(spec: WorkerSpec, sockets: list[socket.socket]) -> None:
    """The target of a worker process: serve on the inherited listening sockets until drained."""
    from gateway.engines.supervisor import die_with_parent

    die_with_parent()
    # Signals come from the main process only (it forwards SIGTERM and Ctrl-C), not straight
    # from the terminal: a second Ctrl-C means "stop at once", so one press must arrive once.
    os.setpgrp()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's lifespan handles it (reopens logs)
    configure_logging(spec.log_level)
    lifeline.watch_parent()  # the main process gone: stop at once, gone within seconds
    server = build_server(spec)
    server.run(sockets)
    lifeline.finish(0 if server.started else STARTUP_FAILURE)  # nothing (the pool) may hold the exit
