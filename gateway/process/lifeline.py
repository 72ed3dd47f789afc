"""A worker's tie to the main process, and an exit that nothing can hold up.

Workers lead their own process group (signals reach them only through the main process), so when
the main process dies outright (SIGKILL, or a stop cut short: SIGTERM to its group, SIGKILL two
seconds later) nobody tells them. Left alone, a worker went on accepting on the inherited port
for 5 to 10 seconds, and one whose prompt-counting pool had started hung at exit joining the pool.

`watch_parent` waits on multiprocessing's parent sentinel (a pipe whose other end only the main
process holds: it reads as closed the moment the main process is gone, however it died). Then the
worker stops as on a second Ctrl-C: listeners closed at once, requests cut, no drain; and if it is
still alive `ORPHAN_DEADLINE` seconds later, it kills its own children and leaves with `os._exit`.

`finish` ends every worker: its children (the prompt-counting pool) killed rather than joined (a
pool child waiting on its queue never returns, and Python joins non-daemonic children and the
pool's queue threads at exit), the log flushed, then `os._exit`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import NoReturn

log = logging.getLogger(__name__)

ORPHAN_DEADLINE = 4.0  # seconds from the main process's death to a worker's forced exit
SECOND_SIGNAL_AFTER = 0.2


def watch_parent() -> None:
    """Starts the watch in a daemon thread (a no-op in a process not started by multiprocessing)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel
    threading.Thread(target=_watch, args=(sentinel,), name="lifeline", daemon=True).start()


def _watch(sentinel: int) -> None:
    wait([sentinel])
    log.error("the main process is gone: stopping now (listeners closed, requests cut)")
    # the server's signal handler runs in the main thread: the first SIGINT starts a drain without grace
    # (listeners close at the next tick), the second stops at once (gateway/process/worker.py)
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(SECOND_SIGNAL_AFTER)
    time.sleep(max(0.0, ORPHAN_DEADLINE - 2 * SECOND_SIGNAL_AFTER))
    log.error("still running %.0fs after the main process died: exiting now", ORPHAN_DEADLINE)
    finish(1)


def kill_children() -> None:
    """SIGKILL to every multiprocessing child of this process (the prompt-counting pool)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            child.kill()


def finish(code: int) -> NoReturn:
    kill_children()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
