"""Where a process spends its time: record it with py-spy for a while, then rank the functions.

py-spy (a dev dependency) samples the Python stacks of a running process from outside it, without
changing it. The raw ("collapsed") stacks are kept, one file per recording, so they can be opened in
speedscope or turned into a flame graph; this module also prints the functions that were on CPU most
(self: the sampled frame itself; total: anywhere on the stack) and the share of each package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent) + "/"
# Leaf frames that are a thread blocked on a lock or a queue, which py-spy can count as running (the
# gateway's supervisor thread sleeps in Condition.wait): not CPU, dropped.
IDLE_LEAVES = (
    ("threading.py", ("Condition.wait", "Event.wait", "Thread.join", "Semaphore.acquire")),
    ("queue.py", ("Queue.get", "SimpleQueue.get")),
    ("selectors.py", ("EpollSelector.select", "PollSelector.select", "SelectSelector.select")),
)
# Outer frames on every sample of a server's main thread: listing them says nothing.
NOT_TOP = ("gateway/cli/main.py",)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: scripts/setup.sh installs it (the dev extra)")
    return found


def record(pid: int, seconds: float, out: Path, *, rate: int = 250, cpus: str | None = None) -> subprocess.Popen[bytes]:
    """Start recording `pid` for `seconds` into `out` (collapsed stacks, one line per distinct stack)."""
    args = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate)]
    # --subprocesses: `llm-gateway serve` serves in worker processes, children of the one started
    args.append("--subprocesses")
    # --function: one name per function, not per line, so a function's samples add up.
    args += ["--format", "raw", "--function", "--output", str(out)]
    if cpus is not None:
        args = ["taskset", "-c", cpus, *args]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass(frozen=True)
class Profile:
    samples: int
    self_counts: Counter[str]  # frame -> samples where it was the innermost frame
    total_counts: Counter[str]  # frame -> samples where it was anywhere on the stack
    package_self: Counter[str]  # package -> samples whose innermost frame is in it


def where(frame: str) -> str:
    """The frame's file, relative to site-packages, the standard library or this repository."""
    place = frame.partition(" (")[2].rstrip(")")
    if "site-packages/" in place:
        return place.split("site-packages/", 1)[1]
    if "/lib/python3" in place:
        return place.split("/lib/python3", 1)[1].partition("/")[2]
    return place.removeprefix(ROOT)


def package(frame: str) -> str:
    """The top-level package (or stdlib module) a frame is in: gateway, aiohttp, uvicorn, asyncio, ..."""
    first = where(frame).split("/", 1)[0]
    if first.startswith("<"):  # <frozen abc>, <string> (dataclass methods): the interpreter's own
        return "python"
    return first.split(".", 1)[0].lstrip("_") or "other"


def idle(frame: str) -> bool:
    name, file = frame.partition(" (")[0], where(frame).partition(":")[0]
    return any(file.endswith(f) and name in names for f, names in IDLE_LEAVES)


def load(path: Path) -> Profile:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    package_self: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or idle(frames[-1]):
            continue
        samples += count
        self_counts[frames[-1]] += count
        package_self[package(frames[-1])] += count
        for frame in set(frames):
            total_counts[frame] += count
    return Profile(samples, self_counts, total_counts, package_self)


def short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    return f"{frame.partition(' (')[0]} ({where(frame)})"


def report(title: str, profile: Profile, top: int = 20) -> str:
    """The top functions by self and by total samples, and each package's share, as text."""
    n = max(profile.samples, 1)
    lines = [
        f"\n--- {title}: {profile.samples} samples on CPU ---",
        "by package (innermost Python frame; asyncio's Runner.run is uvloop's own C code: the loop, socket I/O):",
    ]
    for name, count in profile.package_self.most_common():
        lines.append(f"  {count / n:6.1%}  {name}")
    lines.append(f"top {top} functions by self samples:")
    for frame, count in profile.self_counts.most_common(top):
        lines.append(f"  {count / n:6.1%}  {short(frame)}")
    lines.append(f"top {top} gateway functions by total samples (their callees included):")
    ours = [
        (f, c)
        for f, c in profile.total_counts.most_common()
        if where(f).startswith("gateway/") and not where(f).startswith(NOT_TOP)
    ]
    for frame, count in ours[:top]:
        lines.append(f"  {count / n:6.1%}  {short(frame)}")
    return "\n".join(lines)
