"""`llm-gateway serve`: the gateway's main process.

It binds the listeners (the public one, and the admin one with `server.admin_port`), starts the
managed engines (gateway/engines/supervisor.py) and N worker processes that serve the requests on the
inherited sockets (gateway/process/worker.py), and carries the control channel between them
(gateway/engines/control.py) and, with several workers, the sum of their metrics
(gateway/process/metrics_hub.py). The engines are started once whatever N, outlive a crashed worker, and stop
last, after the workers drained. This process says one line when the gateway can serve (the
listeners are bound, every worker serves, every model has a healthy engine) and one when it has
stopped.

Reloading: SIGHUP, or `POST /admin/reload` on any worker (gateway/process/reload.py).

Stopping: SIGTERM or Ctrl-C. The workers drain (gateway/proxy/drain.py); this process closes its own
copy of the listening sockets when they close theirs (after `server.drain_grace` on SIGTERM, at
once on Ctrl-C), so that new connections are refused rather than left queued; it waits for the
workers (at most `drain_timeout` plus the time to end what was cut), then stops the engines. A
second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.engines.control import ControlServer, EngineState, encode
from gateway.engines.supervisor import Supervisor
from gateway.process.metrics_hub import MetricsHub
from gateway.process.reload import MainReloads
from gateway.process.worker import CUT_WAIT, STARTUP_FAILURE, WorkerSpec, run_worker
from gateway.settings import ConfigError, Settings
from gateway.settings.source import ConfigSource, Loaded, check_tls

log = logging.getLogger("gateway")

WORKER_STOP_MARGIN = 5.0  # past drain_timeout + CUT_WAIT, a worker is killed
READY_WAIT_EXTERNAL = 10.0  # with no managed engine: how long to wait for external ones before saying so


class StartError(Exception):
    """The gateway cannot start; the message says why and what to do."""


@dataclass
class Listeners:
    public: socket.socket
    admin: socket.socket | None

    def all(self) -> list[socket.socket]:
        return [self.public] + ([self.admin] if self.admin else [])

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def bind(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(4096)  # queued by the kernel until a worker accepts
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def prepare(settings: Settings) -> tuple[Supervisor, Listeners]:
    """Everything that can fail before anything starts: engine ports, TLS files, the listeners."""
    supervisor = Supervisor(settings.engines, tracing=settings.tracing)
    conflicts = supervisor.conflicts()
    if conflicts:
        raise StartError("\n".join(conflicts))
    try:
        check_tls(settings)
    except ConfigError as exc:
        raise StartError(str(exc)) from None
    s = settings.server
    public = bind(s.host, s.port, "server.port")
    try:
        admin = bind(s.admin_address, s.admin_port, "server.admin_port") if s.admin_port else None
    except StartError:
        public.close()
        raise
    return supervisor, Listeners(public, admin)


class MainProcess:
    def __init__(
        self,
        settings: Settings,
        supervisor: Supervisor,
        listeners: Listeners,
        log_level: str,
        source: ConfigSource | None = None,
        loaded: Loaded | None = None,
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.listeners = listeners
        self.log_level = log_level
        self.source = source
        self.version = loaded.version if loaded is not None else ""
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # in reload announcements
        self.workers: list[BaseProcess] = []
        self._dir = tempfile.mkdtemp(prefix="llm-gateway-")
        self._control = ControlServer(os.path.join(self._dir, "control.sock"), self._handle, self._gone, self._states)
        supervisor.on_change = lambda: self._control.broadcast(self._states())
        self.reloads: MainReloads | None = None
        if source is not None and loaded is not None:
            self.reloads = MainReloads(source, loaded, supervisor, self._control, self._commit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._hello: set[int] = set()
        self._health: dict[int, dict[str, bool]] = {}
        self._stop = asyncio.Event()
        self._signal: int | None = None
        self._stopping_since = 0.0
        self._exit_code = 0
        self._metrics: MetricsHub | None = None  # with several workers: sums their metrics for /metrics

    # -- the control channel -------------------------------------------------------------------

    def _states(self) -> bytes:
        return encode({"op": "states", "engines": self.supervisor.states()})

    def _handle(self, worker: int, message: dict[str, Any]) -> dict[str, Any] | None:
        op = message.get("op")
        engines = message.get("engines")
        if op == "hello":
            self._hello.add(worker)
            if self.reloads is not None:
                self.reloads.hello(worker, message.get("version"))
        elif op == "reloaded" and self.reloads is not None:
            self.reloads.answered(worker, message)
        elif op == "reload_request":
            self._background(self._reload_for(worker, message.get("id"), str(message.get("why") or "a worker")))
        elif op == "wake":
            name = str(message.get("engine"))
            return {"op": "woken", "engine": name, "started": self.supervisor.wake(name)}
        elif op == "load" and isinstance(engines, dict):
            self.supervisor.report(worker, engines)
        elif op == "health" and isinstance(engines, dict):
            self._health[worker] = {str(k): bool(v) for k, v in engines.items()}
        return None

    def _gone(self, worker: int) -> None:
        if self.reloads is not None:
            self.reloads.gone(worker)
        self._hello.discard(worker)
        self._health.pop(worker, None)
        self.supervisor.forget(worker)

    # -- reloads (gateway/process/reload.py) ----------------------------------------------------

    async def _reload_for(self, worker: int, rid: Any, why: str) -> None:
        """A worker's reload request (the admin API): the outcome goes back to it."""
        if self.reloads is None:
            answer = {"status": "failed", "version": self.version, "errors": ["this gateway has no file to reload"]}
        else:
            answer = (await self.reloads.run(why)).json()
        self._control.send(worker, {"op": "reload_result", "id": rid, **answer})

    async def _reload_on_hup(self) -> None:
        """SIGHUP: the file again; a change is announced to the other replicas by one worker."""
        if self.reloads is None:
            return
        outcome = await self.reloads.run("SIGHUP")
        if outcome.status == "reloaded" and (workers := self._control.workers):
            self._control.send(workers[0], {"op": "announce", "version": outcome.version})

    def _commit(self, loaded: Loaded) -> None:
        self.settings, self.version = loaded.settings, loaded.version

    def _on_hup(self) -> None:
        self._send_workers(signal.SIGHUP)  # each worker reopens its access log (logrotate)
        self._background(self._reload_on_hup())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life ----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # SIGHUP: the configuration file is reloaded (gateway/process/reload.py), and each worker
        # reopens its access log file (logrotate: gateway/observe/access_log.py).
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        s = self.settings.server
        if s.workers > 1:
            self._metrics = MetricsHub(os.path.join(self._dir, "metrics.sock"))
            await self._metrics.start()
        await self._control.start()
        try:
            await self.supervisor.start()
            self.workers = [self._spawn(i) for i in range(s.workers)]
            tasks = [loop.create_task(self._watch_workers()), loop.create_task(self._announce_ready())]
            await self._stop.wait()
            for task in [*tasks, *self._tasks]:
                task.cancel()
            await self._stop_workers()
        finally:
            await self.supervisor.stop()
            await self._control.close()
            if self._metrics is not None:
                await self._metrics.close()
            self.listeners.close()
            shutil.rmtree(self._dir, ignore_errors=True)
        took = f" after {time.monotonic() - self._stopping_since:.1f}s" if self._stopping_since else ""
        log.info("llm-gateway stopped%s: workers drained, engines stopped", took)
        return self._exit_code

    def _spawn(self, index: int) -> BaseProcess:
        spec = WorkerSpec(
            self.settings,
            index,
            self.log_level,
            self._control.path,
            self._metrics.path if self._metrics is not None else None,
            self.source,
            self.version,
            self.replica,
        )
        process = multiprocessing.get_context("spawn").Process(
            target=run_worker, args=(spec, self.listeners.all()), name=f"llm-gateway-worker-{index}"
        )
        process.start()
        return process

    def _on_signal(self, sig: int) -> None:
        if self._stopping_since:
            if sig == signal.SIGINT:
                log.warning("second Ctrl-C: stopping at once")
                self._send_workers(signal.SIGINT)
            return
        self._signal = sig
        self._stopping_since = time.monotonic()
        s = self.settings.server
        grace = 0.0 if sig == signal.SIGINT else s.drain_grace
        log.info(
            "stopping (%s): /ready is 503 now, new connections refused after %.3gs, in-flight work may "
            "finish until %.3gs; Ctrl-C again to stop at once",
            signal.Signals(sig).name,
            grace,
            s.drain_timeout,
        )
        self._send_workers(sig)  # workers lead their own process group: this is their only signal
        asyncio.get_running_loop().call_later(grace, self.listeners.close)
        self._stop.set()

    def _send_workers(self, sig: int) -> None:
        for process in self.workers:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    async def _stop_workers(self) -> None:
        s = self.settings.server
        deadline = self._stopping_since + s.drain_timeout + CUT_WAIT + WORKER_STOP_MARGIN
        for process in self.workers:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5)

    async def _watch_workers(self) -> None:
        """A worker that dies is replaced; one that cannot start stops the gateway."""
        while True:
            await asyncio.sleep(0.2)
            for i, process in enumerate(self.workers):
                code = process.exitcode
                if code is None or self._stopping_since:
                    continue
                if code == STARTUP_FAILURE:
                    log.error("a worker could not start (see above); stopping")
                    self._exit_code = 1
                    self._stopping_since = time.monotonic()
                    self._send_workers(signal.SIGTERM)
                    self._stop.set()
                    return
                log.warning("worker %s exited with %s; starting another", process.pid, code)
                self.workers[i] = self._spawn(i)

    # -- the ready line ------------------------------------------------------------------------

    def _model_readiness(self) -> dict[str, bool]:
        healthy = {name for report in self._health.values() for name, ok in report.items() if ok}
        engines = {e.name: e for e in self.settings.engines}
        states = self.supervisor.states()
        wakeable = {name for name, e in engines.items() if e.idle_stop and states.get(name) == str(EngineState.STOPPED)}
        # A `discover: dns` entry stands for the engines "ENTRY@ADDRESS": ready with a healthy one,
        # and cold (its requests wait: gateway/dispatch/wake.py) while none is found.
        reported = {name for report in self._health.values() for name in report}
        for name, e in engines.items():
            if e.discovery is not None:
                members = {n for n in reported if n.startswith(name + "@")}
                if members & healthy or not members:
                    wakeable.add(name)
        return {
            m.name: any(n in healthy or n in wakeable for r in m.routes if r.weight > 0 for n in r.engines)
            for m in self.settings.models
        }

    async def _announce_ready(self) -> None:
        managed = [e.startup_timeout for e in self.settings.engines if e.managed]
        deadline = time.monotonic() + max([READY_WAIT_EXTERNAL, *managed])
        n = self.settings.server.workers
        warned = False
        while True:
            await asyncio.sleep(0.1)
            models = self._model_readiness()
            serving = len(self._hello) >= n
            if serving and all(models.values()):
                break
            if time.monotonic() >= deadline:
                if serving and any(models.values()):
                    break
                if not warned:
                    warned = True
                    states = ", ".join(f"{k} {v}" for k, v in self.supervisor.states().items()) or "none managed"
                    log.warning("not ready yet: no model has a healthy engine (engines: %s)", states)
        s = self.settings.server
        tls = s.tls is not None
        ready = [m for m, ok in models.items() if ok]
        waiting = [m for m, ok in models.items() if not ok]
        where = url(s.host, self.listeners.public.getsockname()[1], tls)
        admin = f"; admin API and /metrics on {url(s.admin_address, s.admin_port, tls)}" if s.admin_port else ""
        late = f"; not ready yet: {', '.join(waiting)}" if waiting else ""
        log.info(
            "llm-gateway is ready on %s: %s (%d worker%s%s)%s. Stop it with Ctrl-C or `kill -TERM %d`.",
            where,
            ", ".join(ready),
            n,
            "" if n == 1 else "s",
            admin,
            late,
            os.getpid(),
        )


def raise_open_files(settings: Settings) -> None:
    """Every connection a worker holds is two descriptors (the client's and the engine's): lift
    the soft limit on open files to what max_connections needs, within the hard limit (workers
    inherit it). A stream-heavy gateway otherwise fails at the distribution's default of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * settings.server.max_connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            fits = max(0, (new - 1024) // 2)
            log.warning(
                "open files are limited to %d (the hard limit), fewer than the %d that server.max_connections "
                "%d needs: a worker may run out of file descriptors past about %d connections. Either raise the "
                "limit (`ulimit -Hn %d` as root, LimitNOFILE=%d under systemd, `docker run --ulimit nofile=%d`) "
                "or set server.max_connections to %d or less in the config.",
                new,
                wanted,
                settings.server.max_connections,
                fits,
                wanted,
                wanted,
                wanted,
                fits,
            )


def serve(source: ConfigSource, loaded: Loaded, log_level: str) -> int:
    """Runs the gateway until it is stopped; the exit code. `loaded` was read from `source`,
    which reloads read again."""
    settings = loaded.settings
    raise_open_files(settings)
    try:
        supervisor, listeners = prepare(settings)
    except StartError as exc:
        for line in str(exc).splitlines():
            log.error("%s", line)
        return 1
    main = MainProcess(settings, supervisor, listeners, log_level, source, loaded)
    return asyncio.run(main.run())
