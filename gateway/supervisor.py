"""Starts the managed engine processes, restarts them with backoff when they die, stops them at the end.

It runs once per gateway (in the CLI's main process), not once per uvicorn worker, so N workers
share the same engines. Routing does its own health checks; this module only keeps processes up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from gateway.settings import EngineSettings

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a process that lived this long resets the backoff


def engine_command(engine: EngineSettings) -> list[str]:
    python = engine.python or sys.executable
    if engine.kind == "vllm":
        from gateway.vllm_launch import vllm_command

        return vllm_command(engine, python)
    cmd = [python, "-m", "engines.worker", "--model", str(engine.model), "--port", str(engine.port)]
    if engine.served_model_name:
        cmd += ["--served-model-name", engine.served_model_name]
    return [*cmd, *engine.args]


def _die_with_parent() -> None:
    # Linux: the engine gets SIGTERM if the gateway is killed outright, so none is orphaned.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


@dataclass
class ManagedProcess:
    engine: EngineSettings
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    healthy_once: bool = False  # answered /health since this start
    backoff: float = BACKOFF_START
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    next_start: float = 0.0


class Supervisor:
    def __init__(self, engines: tuple[EngineSettings, ...], check_interval: float = 0.2) -> None:
        self.processes = [ManagedProcess(e) for e in engines if e.managed]
        self._interval = check_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for p in self.processes:
            self._spawn(p)
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, p: ManagedProcess) -> None:
        e = p.engine
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **e.env}
        if e.kind == "vllm":
            from gateway.vllm_launch import vllm_env

            env.update(vllm_env(e, os.path.join(tempfile.gettempdir(), f"llm-gateway-vllm-{e.name}")))
        cmd = engine_command(e)
        log.info("starting engine %s: %s", e.name, " ".join(cmd))
        p.proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        p.started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            for p in self.processes:
                if p.proc is None or p.proc.poll() is None:
                    if p.proc is not None and now - p.started_at > STABLE_AFTER:
                        p.backoff = BACKOFF_START
                    if p.proc is not None and not p.healthy_once:
                        self._check_startup(p, now)
                    continue
                if not p.next_start:
                    # vLLM runs its engine core and workers as child processes: when the server
                    # dies they must not live on as orphans holding memory and cores.
                    _kill_group(p.proc)
                    p.next_start = now + p.backoff
                    log.warning(
                        "engine %s exited with %s; restarting in %.1fs",
                        p.engine.name,
                        p.proc.returncode,
                        p.backoff,
                    )
                    p.backoff = min(p.backoff * 2, BACKOFF_MAX)
                elif now >= p.next_start and not self._stop.is_set():
                    recent = [t for t in p.restarts if now - t < 60]
                    if len(recent) >= p.engine.max_restarts_per_minute:
                        continue  # crash loop: wait for the window to pass
                    p.restarts.append(now)
                    p.next_start = 0.0
                    self._spawn(p)

    def _check_startup(self, p: ManagedProcess, now: float) -> None:
        """An engine that never becomes healthy (hung loading, wedged compile) is killed and restarted."""
        assert p.proc is not None
        try:
            with urllib.request.urlopen(p.engine.url + p.engine.health_path, timeout=1) as r:
                p.healthy_once = r.status == 200
        except (OSError, ValueError):
            pass
        if not p.healthy_once and now - p.started_at > p.engine.startup_timeout:
            log.warning("engine %s not healthy %.0fs after start; killing it", p.engine.name, p.engine.startup_timeout)
            p.proc.kill()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        running = [p.proc for p in self.processes if p.proc and p.proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("engine pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(5)
        for p in self.processes:
            if p.proc is not None:
                _kill_group(p.proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kills what is left of an engine's process group (each engine leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
