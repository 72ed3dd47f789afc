"""One worker process of the gateway: the app on uvicorn, driven by our code, with the graceful drain.

The main process (gateway/process/main.py) binds the listeners once and starts N of these with the
sockets (`run_worker`); each serves both the public and the admin listener (gateway/front/listeners.py)
with one app and one lifespan, over our HTTP protocol (gateway/front/connection.py: header, body,
keep-alive and connection limits) and, with `server.tls`, HTTPS.

`GatewayServer` is uvicorn's `Server` with its shutdown replaced by the drain of gateway/proxy/drain.py:
the first SIGTERM or Ctrl-C starts it (uvicorn would stop accepting at once and cut whatever runs
past a fixed grace, mid-stream, without a word); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from types import FrameType

import uvicorn

from gateway.front.connection import limited_protocol
from gateway.proxy.drain import Drain
from gateway.settings import ServerSettings, Settings

log = logging.getLogger(__name__)

CUT_WAIT = 5.0  # after the drain timeout: how long cut requests get to end and reconcile
STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Every line with a timestamp and a level, in every process; uvicorn's own chatter only when debugging."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, format=LOG_FORMAT, force=True)
    quiet = max(numeric, logging.WARNING) if numeric > logging.DEBUG else numeric
    for name in ("uvicorn", "uvicorn.error", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger("uvicorn.access").disabled = True


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it by multiprocessing's spawn)."""

    settings: Settings
    index: int
    log_level: str = "info"
    control_path: str | None = None
    multiprocess_dir: str | None = None


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, settings: ServerSettings) -> None:
        super().__init__(config)
        self.drain = drain
        self.settings = settings
        self._closed = False
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: note the time and let on_tick act (no I/O here).
        if self.drain.draining:
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self.drain.begin(0.0 if sig == signal.SIGINT else self.settings.drain_grace)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        drain = self.drain
        if not drain.draining:
            return False
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
        if self._closed and not self.server_state.tasks:
            return True
        return elapsed >= self.settings.drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._close_listeners()
        for sock in sockets or []:
            sock.close()
        self._shutdown_connections()
        state = self.server_state
        if state.tasks and not self.force_exit:
            cut = self.drain.cut_all()
            log.warning("drain timeout: %d request(s) still in flight were ended (503 or an SSE error)", cut)
            await self._wait_tasks(CUT_WAIT)
        if state.tasks:
            log.warning("cancelling %d request task(s) that did not end", len(state.tasks))
            for task in list(state.tasks):
                task.cancel()
            await self._wait_tasks(1.0)
        for server in getattr(self, "servers", []):
            try:
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
            except TimeoutError:
                pass
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _close_listeners(self) -> None:
        if not self._closed:
            self._closed = True
            for server in getattr(self, "servers", []):
                server.close()
            self._shutdown_connections()  # also those accepted during the grace period

    def _shutdown_connections(self) -> None:
        # Idle keep-alive connections close now; busy ones after their response.
        for connection in list(self.server_state.connections):
            connection.shutdown()

    async def _wait_tasks(self, seconds: float) -> None:
        if self.server_state.tasks:
            await asyncio.wait(list(self.server_state.tasks), timeout=seconds)


def build_server(spec: WorkerSpec) -> GatewayServer:
    from gateway.front.app import build_app

    settings = spec.settings
    server = settings.server
    drain = Drain()
    app = build_app(settings, multiprocess=spec.multiprocess_dir, drain=drain, control_path=spec.control_path)
    config = uvicorn.Config(
        app,
        http=limited_protocol(server, drain),
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_keep_alive=server.keepalive_timeout,  # type: ignore[arg-type]  # a float works
        ssl_certfile=server.tls.cert if server.tls else None,
        ssl_keyfile=server.tls.key if server.tls else None,
        backlog=4096,
        server_header=False,
        # The client's address is the peer's; X-Forwarded-For counts only from the proxies named
        # in logging.trusted_proxies (gateway/observe/client_address.py), not uvicorn's default 127.0.0.1.
        proxy_headers=False,
    )
    return GatewayServer(config, drain, server)


def run_worker(spec: WorkerSpec, sockets: list[socket.socket]) -> None:
    """The target of a worker process: serve on the inherited listening sockets until drained."""
    from gateway.engines.supervisor import die_with_parent

    die_with_parent()
    # Signals come from the main process only (it forwards SIGTERM and Ctrl-C), not straight
    # from the terminal: a second Ctrl-C means "stop at once", so one press must arrive once.
    os.setpgrp()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's lifespan handles it (reopens logs)
    configure_logging(spec.log_level)
    server = build_server(spec)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)
