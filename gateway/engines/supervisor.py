"""Starts the managed engine processes, restarts them when they die, stops them when idle and at the end.

It runs once per gateway, in the main process (gateway/process/main.py), whatever the number of worker
processes, so N workers share the same engines. Each engine has a state (gateway/engines/control.py) that
the workers follow over the control channel; they route only to engines said to be running:

    stopped --wake--> starting --answers /health--> running --idle_stop without traffic--> stopping
       ^                 ^                             |   (traffic while stopping: running again)     |
       |                 +------ died: restarted ------+                                               |
       +----------------------------------------- process group stopped <-----------------------------+

    failed: its port is taken by some other process, or it crash-loops; tried again later.

Before every start the engine's port is bind-checked: a second gateway with the same config gets
a clear error naming the engine and the port, instead of crash-looping engines while its health
checks reach the first gateway's engines. Idle time is measured from the workers' load reports
(requests outstanding, requests sent): an engine with a stream in flight is never idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.engines.control import EngineState
from gateway.settings import EngineSettings, TracingSettings
from gateway.settings.changes import launch_changes

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a process that lived this long resets the backoff
TICK = 0.2
STOP_CONFIRM = 1.0  # stopping -> stopped only if no worker reported traffic meanwhile (reports: 4/s)
PORT_RETRY = 10.0  # a taken port is checked again this often
STOP_WAIT = 10.0  # SIGTERM, then this long, then SIGKILL
PROBE_TIMEOUT = 1.0


def engine_command(engine: EngineSettings, tracing: TracingSettings | None = None) -> list[str]:
    python = engine.python or sys.executable
    if engine.kind == "vllm":
        from gateway.engines.vllm_launch import vllm_command

        return vllm_command(engine, python, tracing)
    cmd = [python, "-m", "engines.worker", "--model", str(engine.model), "--port", str(engine.port)]
    if engine.served_model_name:
        cmd += ["--served-model-name", engine.served_model_name]
    return [*cmd, *engine.args]


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Linux: this process gets `sig` when its parent dies outright, so none is orphaned. With
    `parent` (its pid), a parent that died before this call counts too: `sig` comes at once."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _engine_preexec() -> None:
    die_with_parent()
    os.setsid()  # its own process group: vLLM's children are stopped with it


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether some process listens on (or holds) host:port. SO_REUSEADDR: a port in TIME_WAIT
    after our own engine stopped is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_conflict(engine: EngineSettings) -> str:
    return (
        f"engine {engine.name}: port {engine.port} (127.0.0.1:{engine.port}) is already in use by another "
        "process; is another gateway running with the same config? Stop it or give this engine another port."
    )


async def answers_health(engine: EngineSettings) -> bool:
    """One plain GET of the engine's health path: True on a 200."""
    parts = urlsplit(engine.url)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write(f"GET {engine.health_path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
            status = (await reader.readline()).split()
            return len(status) > 1 and status[1] == b"200"
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()


@dataclass(eq=False)
class ManagedEngine:
    settings: EngineSettings
    state: EngineState = EngineState.STOPPED
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    next_start: float = 0.0  # starting without a process: when to (re)start it; failed: when to retry
    last_used: float = 0.0  # when a worker last reported traffic to it
    stop_decided: float = 0.0
    halting: bool = False  # its process is being stopped (idle)
    retiring: bool = False  # a reload removed it: stopped once no worker has a request there
    failure: str = ""  # why it is failed, in words
    wake_after_halt: bool = False
    reported: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (outstanding, picks)

    @property
    def name(self) -> str:
        return self.settings.name

    def busy(self) -> bool:
        return any(outstanding for outstanding, _ in self.reported.values())


class Supervisor:
    def __init__(
        self,
        engines: tuple[EngineSettings, ...],
        on_change: Callable[[], None] = lambda: None,
        tracing: TracingSettings | None = None,
    ) -> None:
        self.engines = {e.name: ManagedEngine(e) for e in engines if e.managed}
        self.tracing = tracing  # on: vLLM engines export their spans to the same collector
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._halts: set[asyncio.Task[None]] = set()

    def states(self) -> dict[str, str]:
        return {name: str(e.state) for name, e in self.engines.items()}

    def conflicts(self) -> list[str]:
        """The engines whose port another process holds: checked before the gateway starts."""
        return [port_conflict(e.settings) for e in self.engines.values() if port_taken(e.settings.port or 0)]

    async def start(self) -> None:
        for e in self.engines.values():
            self._spawn(e, time.monotonic())
        self._task = asyncio.create_task(self._watch(), name="engine-supervisor")

    def wake(self, name: str) -> bool:
        """A request needs this engine: start it if it is stopped. True when this call started it."""
        e = self.engines.get(name)
        if e is None or not e.settings.idle_stop or e.retiring:
            return False
        now = time.monotonic()
        e.last_used = now
        if e.state == EngineState.STOPPING and not e.halting:
            self._set(e, EngineState.RUNNING)  # traffic came back before it was stopped
            return False
        if e.halting:
            started = not e.wake_after_halt
            e.wake_after_halt = True
            return started
        if e.state == EngineState.STOPPED or (e.state == EngineState.FAILED and now >= e.next_start):
            self._spawn(e, now)
            return e.state == EngineState.STARTING
        return False

    def report(self, worker: int, loads: dict[str, list[int]]) -> None:
        """A worker's load: per engine, requests outstanding and requests sent so far. Each report
        is whole: an engine it leaves out has none of that worker's requests (its pool let go of it)."""
        now = time.monotonic()
        for name, engine in self.engines.items():
            if name not in loads:
                engine.reported.pop(worker, None)
        for name, load in loads.items():
            e = self.engines.get(name)
            if e is None or not isinstance(load, list) or len(load) != 2:
                continue
            outstanding, picks = int(load[0]), int(load[1])
            before = e.reported.get(worker)
            if outstanding > 0 or (before is not None and picks != before[1]) or (before is None and picks > 0):
                e.last_used = now
            e.reported[worker] = (outstanding, picks)

    def forget(self, worker: int) -> None:
        for e in self.engines.values():
            e.reported.pop(worker, None)

    # -- changes made by a reload (gateway/process/reload.py) ---------------------------------

    def add(self, settings: EngineSettings) -> None:
        """A managed engine the new configuration adds: started now (or kept, when an earlier
        reload dropped it and it has not stopped yet)."""
        e = self.engines.get(settings.name)
        if e is not None and e.retiring and not launch_changes(e.settings, settings):
            e.retiring, e.settings = False, settings
            return
        e = self.engines[settings.name] = ManagedEngine(settings)
        self._spawn(e, time.monotonic())

    def stopping(self, settings: EngineSettings) -> bool:
        """Whether an engine of that name, dropped by an earlier reload and not stopped yet, runs
        with other launch settings (the new one must wait for it: its port, its memory)."""
        e = self.engines.get(settings.name)
        return e is not None and bool(launch_changes(e.settings, settings))

    def update(self, settings: EngineSettings) -> None:
        """New settings for a managed engine that need no new process (idle_stop, timeouts)."""
        e = self.engines.get(settings.name)
        if e is not None:
            e.settings = settings

    def retire(self, name: str) -> None:
        """The new configuration drops it: no new request goes there, and it is stopped once no
        worker reports a request of its own there (those of the old configuration finish)."""
        e = self.engines.get(name)
        if e is not None:
            e.retiring = True

    async def started(self, names: list[str]) -> list[str]:
        """Waits until these engines answer /health; what went wrong for those that did not
        within their startup timeout (their port is taken, they crash, they are too slow)."""
        engines = [self.engines[n] for n in names if n in self.engines]
        deadline = time.monotonic() + max((e.settings.startup_timeout for e in engines), default=0.0)
        while time.monotonic() < deadline:
            if all(e.state in (EngineState.RUNNING, EngineState.FAILED) for e in engines):
                break
            await asyncio.sleep(TICK)
        problems = []
        for e in engines:
            if e.state == EngineState.FAILED:
                problems.append(f"engine {e.name} did not start: {e.failure} (see the log)")
            elif e.state != EngineState.RUNNING:
                timeout = e.settings.startup_timeout
                problems.append(
                    f"engine {e.name} did not start: not healthy {timeout:.0f}s after its start (see the log)"
                )
        return problems

    async def remove(self, name: str, why: str) -> None:
        """Stops the engine now and forgets it (a reload that failed takes back what it started)."""
        e = self.engines.get(name)
        if e is not None:
            await self._halt(e, why)
            self.engines.pop(name, None)
            self.on_change()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._halts, return_exceptions=True)
        running = [e for e in self.engines.values() if e.proc is not None]
        await asyncio.gather(*(self._halt(e, "the gateway stops") for e in running))

    # -- the watch loop ------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self._tick()
            except Exception:
                log.exception("engine supervisor: unexpected error; carrying on")

    async def _tick(self) -> None:
        now = time.monotonic()
        probes = []
        for e in list(self.engines.values()):
            if e.halting:
                continue
            if e.retiring:
                if not e.busy() and now - e.last_used >= STOP_CONFIRM:
                    e.halting = True  # one halt, however many ticks it takes
                    self._background(self.remove(e.name, "the configuration no longer has it"))
                continue
            if e.proc is not None and e.proc.poll() is not None:
                self._died(e, now)
            elif e.state == EngineState.STARTING and e.proc is None:
                if now >= e.next_start:
                    self._restart(e, now)
            elif e.state == EngineState.STARTING:
                probes.append(self._probe(e, now))
            elif e.state == EngineState.RUNNING:
                self._running(e, now)
            elif e.state == EngineState.STOPPING:
                self._stopping(e, now)
            elif e.state == EngineState.FAILED and now >= e.next_start:
                self._restart(e, now)
        if probes:
            await asyncio.gather(*probes)

    def _spawn(self, e: ManagedEngine, now: float) -> None:
        s = e.settings
        if port_taken(s.port or 0):
            e.failure = f"its port {s.port} is in use by another process"
            if e.state != EngineState.FAILED:
                log.error("%s; retrying every %.0fs", port_conflict(s), PORT_RETRY)
            e.next_start = now + PORT_RETRY
            self._set(e, EngineState.FAILED)
            return
        # No progress bars: engines log into the gateway's log, where a bar is noise.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **s.env}
        if s.kind == "vllm":
            from gateway.engines.vllm_launch import vllm_env

            cache = os.path.join(tempfile.gettempdir(), f"llm-gateway-vllm-{s.name}")
            env.update(vllm_env(s, cache, self.tracing))
        cmd = engine_command(s, self.tracing)
        log.info("starting engine %s: %s", s.name, " ".join(cmd))
        e.proc = subprocess.Popen(cmd, env=env, preexec_fn=_engine_preexec)
        e.started_at = now
        self._set(e, EngineState.STARTING)

    def _restart(self, e: ManagedEngine, now: float) -> None:
        recent = [t for t in e.restarts if now - t < 60]
        if len(recent) >= e.settings.max_restarts_per_minute:
            e.failure = f"it crash-loops ({len(recent)} restarts in a minute)"
            if e.state != EngineState.FAILED:
                log.error("engine %s crash-loops (%d restarts in a minute); pausing its restarts", e.name, len(recent))
            e.next_start = recent[0] + 60
            self._set(e, EngineState.FAILED)
            return
        e.restarts.append(now)
        self._spawn(e, now)

    def _died(self, e: ManagedEngine, now: float) -> None:
        assert e.proc is not None
        code = e.proc.returncode
        # vLLM runs its engine core and workers as child processes: they must not live on.
        _kill_group(e.proc)
        e.proc = None
        e.next_start = now + e.backoff
        log.warning("engine %s exited with %s; restarting in %.1fs", e.name, code, e.backoff)
        e.backoff = min(e.backoff * 2, BACKOFF_MAX)
        self._set(e, EngineState.STARTING)

    async def _probe(self, e: ManagedEngine, now: float) -> None:
        if await answers_health(e.settings):
            if e.halting or e.state != EngineState.STARTING:
                return
            log.info("engine %s is up (%.1fs after start)", e.name, time.monotonic() - e.started_at)
            e.last_used = time.monotonic()  # idle time counts from here
            self._set(e, EngineState.RUNNING)
        elif now - e.started_at > e.settings.startup_timeout and e.proc is not None:
            log.warning("engine %s not healthy %.0fs after start; killing it", e.name, e.settings.startup_timeout)
            e.proc.kill()

    def _running(self, e: ManagedEngine, now: float) -> None:
        if now - e.started_at > STABLE_AFTER:
            e.backoff = BACKOFF_START
        idle_stop = e.settings.idle_stop
        if idle_stop and not e.busy() and now - e.last_used >= idle_stop:
            e.stop_decided = now
            self._set(e, EngineState.STOPPING)  # workers stop sending it requests now

    def _stopping(self, e: ManagedEngine, now: float) -> None:
        if e.busy() or e.last_used > e.stop_decided:
            self._set(e, EngineState.RUNNING)
        elif now - e.stop_decided >= STOP_CONFIRM:
            idle = now - e.last_used
            self._background(self._halt(e, f"no traffic for {idle:.0f}s (idle_stop)"))

    def _background(self, stopping: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(stopping)
        self._halts.add(task)
        task.add_done_callback(self._halts.discard)

    async def _halt(self, e: ManagedEngine, why: str) -> None:
        """Stops the engine's whole process group (SIGTERM, then SIGKILL): its memory is freed."""
        proc = e.proc
        if proc is None:
            return
        e.halting = True
        try:
            log.info("stopping engine %s: %s", e.name, why)
            if proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, STOP_WAIT)
                except subprocess.TimeoutExpired:
                    log.warning("engine %s ignored SIGTERM for %.0fs; killing it", e.name, STOP_WAIT)
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 5)
            _kill_group(proc)
            e.proc = None
            self._set(e, EngineState.STOPPED)
        finally:
            e.halting = False
        if e.wake_after_halt and self._task is not None and not self._task.done():
            e.wake_after_halt = False
            self._spawn(e, time.monotonic())

    def _set(self, e: ManagedEngine, state: EngineState) -> None:
        if e.state != state:
            e.state = state
            self.on_change()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kills what is left of an engine's process group (each engine leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
