"""The access log: one line per request, JSON or logfmt, to standard error or a file of its own.

A finished request's `Observation` is only appended to a list; the lines are formatted and
written together a moment later (every FLUSH_INTERVAL, or at once past FLUSH_LINES), in one
write per chunk, so a request pays for neither formatting nor a system call. Chunks end at
line ends and, on a pipe, stay within PIPE_BUF, so the lines of several worker processes never
interleave mid-line.

A file of its own is reopened by `reopen()` (SIGHUP, after logrotate moved it); `reopen_all()`
reopens every access log of the process, for a signal handler to call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

import orjson

from gateway.settings import AccessLogSettings

if TYPE_CHECKING:  # the observer imports this module
    from gateway.observe.observer import Observation

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.25
FLUSH_LINES = 512
FIELDS = (
    "time",
    "request_id",
    "trace_id",
    "client",
    "method",
    "path",
    "key_id",
    "team",
    "api",
    "model",
    "route",
    "engine",
    "batch_id",
    "status",
    "error_code",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "bytes_out",
    "client_hung_up",
)

_open: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def reopen_all() -> None:
    for access_log in list(_open):
        access_log.reopen()


def fields_of(o: Observation) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(o.wall)) + f".{int(o.wall * 1000) % 1000:03d}Z",
        "request_id": o.request_id,
        "trace_id": o.trace_id,
        "client": o.client,
        "method": o.method,
        "path": o.path,
        "key_id": o.key_id,
        "team": o.team,
        "api": o.api,
        "model": o.model,
        "route": o.route,
        "engine": o.engine,
        "batch_id": o.batch_id,
        "status": o.status,
        "error_code": o.error_code,
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "ttft_ms": None if o.ttft is None else round(o.ttft * 1000, 3),
        "duration_ms": round(o.duration * 1000, 3),
        "bytes_out": o.bytes_out,
        "client_hung_up": o.hung_up,
    }


# JSON leaves DEL, the C1 controls (U+0080-U+009F), U+2028 and U+2029 unescaped, and so does
# orjson; but they break or garble lines (str.splitlines splits at U+0085, U+2028 and U+2029;
# terminals act on C1), so a client's path could split or forge a line. Escaped, the JSON is the same.
_UNSAFE = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _escaped(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def json_line(o: Observation) -> bytes:
    line = orjson.dumps(fields_of(o))
    if not line.isascii() or b"\x7f" in line:  # rare: only then looked at closely
        line = _UNSAFE.sub(_escaped, line)
    return line + b"\n"


def json_text(text: str) -> str:
    return _UNSAFE.sub(_escaped, orjson.dumps(text)).decode()


def _logfmt_value(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        # quoted, with escapes (U+2028 and U+2029 too: see json_line)
        return json_text(text)
    return text


def logfmt_line(o: Observation) -> bytes:
    return (" ".join(f"{k}={_logfmt_value(v)}" for k, v in fields_of(o).items()) + "\n").encode()


class AccessLog:
    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self._format = logfmt_line if settings.format == "logfmt" else json_line
        self._pending: list[Observation] = []
        self._timer: asyncio.TimerHandle | None = None
        self._fd = -1
        self._own = settings.file is not None
        self._chunk = 65536
        self.reopen()
        _open.add(self)

    def reopen(self) -> None:
        """Opens the file again by its name (logrotate moved the old one away)."""
        self.flush()
        if not self._own:
            self._fd = sys.stderr.fileno()
        else:
            assert self.settings.file is not None
            fd = os.open(self.settings.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            old, self._fd = self._fd, fd
            if old >= 0:
                os.close(old)
        try:
            regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError:
            regular = False
        self._chunk = 65536 if regular else 4096  # a pipe's writes up to PIPE_BUF are atomic

    def add(self, o: Observation) -> None:
        pending = self._pending
        pending.append(o)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if not pending or self._fd < 0:
            return
        fmt, limit = self._format, self._chunk
        chunk: list[bytes] = []
        size = 0
        for o in pending:
            line = fmt(o)
            if size + len(line) > limit and chunk:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            log.warning("access log: cannot write (%s); %d bytes lost", exc.strerror, len(view))

    def close(self) -> None:
        self.flush()
        _open.discard(self)
        if self._own and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
