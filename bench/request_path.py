"""The gateway's request path against the floor: CPU per request and per chunk, side by side in one run.

Compared, each started by this script and pinned with taskset (bench/servers.py says what each is):
`direct` (the upstream alone), `floor` (bench/floor_proxy.py, uvicorn + Starlette + aiohttp, no features),
`gateway` (auth off), `gateway+quota` (keys and quotas on a private redis-server, whose CPU is counted
too), `gateway-noresume` (auth off, the model's `failover: error`: no stream keeps a transcript for a
resume) and `litellm` (LiteLLM's proxy, master key only). The server under test runs on --server-core (1);
the load generator (this process), the upstream and Redis share --client-core (0). Runs alternate
between the servers, the order rotating each round, and every figure is the median over rounds; the
ratio to the floor is the median of each round's own ratio (the pair shares that round's noise).

Sections (--sections, all but `profile` by default):
- upstreams: the fake upstream's and nginx's own CPU per request and per paced chunk (which to use);
- cpu (figures 1 and 3): non-stream closed loop at 1/16/64 clients: CPU per request, req/s;
- paced (figure 2): streams whose chunks come 5 ms apart, 100/500/1,000 at once: CPU per chunk;
- hold (figure 4): 5,000 streams, chunks 200 ms apart, held by one process: errors, peak RSS;
- workers (figure 5): `--workers 2` vs 1, the gateway free on both cores (with --baseline, that checkout's too);
- profile: py-spy on the gateway (and the floor) under the cpu and paced loads (bench/profile_gateway.sh).

    .venv/bin/python bench/request_path.py [--quick] [--sections cpu,paced] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench import servers
from bench.gateway_overhead import raise_nofile, run_async
from bench.request_path_report import print_figures, summarize
from bench.request_path_runs import Run, closed_run, log_run, paced_run, started, warm_up
from bench.servers import Server, Upstream
from testkit import pyspy

ROOT = Path(__file__).resolve().parent.parent
SERVERS = (
    "direct",
    "floor",
    "gateway",
    "gateway+quota",
    "gateway-noresume",
    "baseline",
    "baseline+quota",
    "litellm",
    "sglang",
)
SECTIONS = ("upstreams", "cpu", "paced", "hold", "workers", "profile")


def rotated(items: list[Server], by: int) -> list[Server]:
    by %= len(items)
    return items[by:] + items[:by]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.runs: list[Run] = []
        self.notes: list[str] = []
        self.idle_ms_per_s: dict[str, float] = {}

    def upstream(self, *, chunks: int, pace_ms: float, kind: str | None = None) -> Upstream:
        return servers.start_upstream(
            kind or self.args.upstream, self.tmp, chunks=chunks, pace_ms=pace_ms, cpus=self.args.client_core
        )

    def proxies(self, url: str, *, litellm: bool = False) -> list[Server]:
        core, tmp = self.args.server_core, self.tmp
        group = [
            servers.floor(tmp, url, core),
            servers.gateway(tmp, url, core),
            servers.gateway(tmp, url, core, quota=servers.RedisServer(tmp, self.args.client_core)),
            # failover: error: streams keep no transcript (resume's cost, side by side with `gateway`)
            servers.gateway(tmp, url, core, name="gateway-noresume", failover="error"),
        ]
        if self.args.baseline is not None:  # the same two, from another checkout: before vs after
            tree = self.args.baseline
            group.append(servers.gateway(tmp, url, core, name="baseline", tree=tree))
            quota = servers.RedisServer(tmp, self.args.client_core)
            group.append(servers.gateway(tmp, url, core, quota=quota, name="baseline+quota", tree=tree))
        if litellm and "litellm" in self.args.servers:
            why = servers.litellm_missing()
            if why:
                self.notes.append(f"litellm not compared: {why}")
            else:
                group.append(servers.litellm(tmp, url, core))
        if "sglang" in self.args.servers:
            why = servers.sglang_missing()
            if why:
                self.notes.append(f"sglang not compared: {why}")
            else:
                group.append(servers.sglang(tmp, url, core))
        return [s for s in group if s.name in self.args.servers]

    def record(self, r: Run, server: Server) -> None:
        self.runs.append(r)
        log_run(r)
        if r.failures:
            print(f"  {server.name} log tail:\n" + server.proc.log_tail(12), flush=True)

    def measure_idle(self, group: list[Server], seconds: float = 3.0) -> None:
        before = {s.name: s.cpu() for s in group}
        time.sleep(seconds)
        for s in group:
            self.idle_ms_per_s[s.name] = (s.cpu() - before[s.name]) / seconds * 1e3
        print("  idle CPU, ms/s: " + ", ".join(f"{k} {v:.1f}" for k, v in self.idle_ms_per_s.items()))

    def section_upstreams(self) -> None:
        """Each upstream alone: CPU per whole answer and per paced chunk."""
        a = self.args
        for kind in ("fake", "nginx"):
            if kind == "nginx" and servers.nginx_missing():
                self.notes.append(f"nginx not measured: {servers.nginx_missing()}")
                continue
            up = self.upstream(chunks=a.paced_chunks, pace_ms=a.pace_ms, kind=kind)
            try:
                for round_ in range(a.rounds):
                    d = servers.direct(up, up.json_url)
                    d.name = f"{kind}"
                    r = run_async(partial(closed_run, "upstreams-json", d, up, round_, 16, a.requests, a.seconds))
                    self.record(r, d)
                    d = servers.direct(up, up.sse_url)
                    d.name = f"{kind}"
                    streams = max(a.paced_streams)
                    run = partial(paced_run, "upstreams-sse", d, up, round_, streams, a.paced_chunks, a.paced_ramp_s)
                    self.record(run_async(run), d)
            finally:
                up.stop()

    def section_cpu(self) -> None:
        a = self.args
        up = self.upstream(chunks=32, pace_ms=0)
        try:
            group = [servers.direct(up, up.json_url), *self.proxies(up.json_url, litellm=True)]
            group = [s for s in group if s.name in a.servers]
            with started(*group):
                warm = partial(closed_run, "warmup", upstream=up, round_=0, clients=8, requests=a.warmup, seconds=5)
                warm_up(group, warm)
                self.measure_idle(group, 1.0 if a.quick else 3.0)
                for round_ in range(a.rounds):
                    for clients in a.levels:
                        for s in rotated(group, round_ + clients):
                            run = partial(closed_run, "cpu", s, up, round_, clients, a.requests, a.seconds)
                            self.record(run_async(run), s)
        finally:
            up.stop()

    def section_paced(self) -> None:
        a = self.args
        up = self.upstream(chunks=a.paced_chunks, pace_ms=a.pace_ms)
        try:
            group = [servers.direct(up, up.sse_url), *self.proxies(up.sse_url)]
            group = [s for s in group if s.name in a.servers]
            with started(*group):
                warm_up(
                    group,
                    partial(paced_run, "warmup", upstream=up, round_=0, streams=20, chunks=a.paced_chunks, ramp_s=0),
                )
                for round_ in range(a.rounds):
                    for streams in a.paced_streams:
                        for s in rotated(group, round_ + streams):
                            r = run_async(
                                partial(paced_run, "paced", s, up, round_, streams, a.paced_chunks, a.paced_ramp_s)
                            )
                            self.record(r, s)
        finally:
            up.stop()

    def section_hold(self) -> None:
        a = self.args
        up = self.upstream(chunks=a.hold_chunks, pace_ms=a.hold_pace_ms)
        try:
            group = self.proxies(up.sse_url)
            with started(*group):
                warm_up(
                    group,
                    partial(paced_run, "warmup", upstream=up, round_=0, streams=20, chunks=a.hold_chunks, ramp_s=0),
                )
                for round_ in range(a.hold_rounds):
                    for s in rotated(group, round_):
                        r = run_async(
                            partial(paced_run, "hold", s, up, round_, a.hold_streams, a.hold_chunks, a.hold_ramp_s)
                        )
                        self.record(r, s)
        finally:
            up.stop()

    def section_workers(self) -> None:
        a = self.args
        both = f"{a.client_core},{a.server_core}"
        up = self.upstream(chunks=32, pace_ms=0)
        try:
            group: list[Server] = []
            for workers in (1, 2):
                if "gateway" in a.servers:
                    group.append(
                        servers.gateway(self.tmp, up.json_url, both, workers=workers, name=f"gateway w{workers}")
                    )
                if "gateway+quota" in a.servers:
                    redis = servers.RedisServer(self.tmp, a.client_core)
                    name = f"gateway+quota w{workers}"
                    group.append(servers.gateway(self.tmp, up.json_url, both, quota=redis, workers=workers, name=name))
                if a.baseline is not None:  # the same, from another checkout: before vs after
                    name = f"baseline w{workers}"
                    group.append(
                        servers.gateway(self.tmp, up.json_url, both, workers=workers, name=name, tree=a.baseline)
                    )
            with started(*group):
                warm_up(
                    group,
                    partial(closed_run, "warmup", upstream=up, round_=0, clients=16, requests=2 * a.warmup, seconds=5),
                )
                for round_ in range(a.rounds):
                    for clients in a.worker_levels:
                        for s in rotated(group, round_):
                            r = run_async(partial(closed_run, "workers", s, up, round_, clients, a.requests, a.seconds))
                            self.record(r, s)
        finally:
            up.stop()

    def section_profile(self) -> None:
        a = self.args
        out_dir = a.profile_dir or ROOT / "bench" / "results" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir.mkdir(parents=True, exist_ok=True)
        streams = max(a.paced_streams)
        for load in ("cpu", "paced"):
            up = self.upstream(chunks=a.paced_chunks, pace_ms=0 if load == "cpu" else a.pace_ms)
            try:
                url = up.json_url if load == "cpu" else up.sse_url
                group = [s for s in self.proxies(url) if s.name in a.profile_targets]
                with started(*group):
                    # Lazy one-time work (the tokenizer, pools) is not the steady state being profiled.
                    if load == "cpu":
                        warm = partial(closed_run, "warmup", upstream=up, round_=0, clients=8, requests=300, seconds=5)
                    else:
                        warm = partial(
                            paced_run, "warmup", upstream=up, round_=0, streams=20, chunks=a.paced_chunks, ramp_s=0
                        )
                    warm_up(group, warm)
                    for s in group:
                        out = out_dir / f"{s.name.replace('+', '-')}-{load}.txt"
                        spy = pyspy.record(s.process.pid, a.profile_s, out, cpus=a.client_core)
                        deadline = time.monotonic() + a.profile_s
                        while time.monotonic() < deadline:  # keep it loaded for the whole recording
                            if load == "cpu":
                                run = partial(closed_run, "profile", s, up, 0, 16, 10**9, deadline - time.monotonic())
                            else:
                                run = partial(paced_run, "profile", s, up, 0, streams, a.paced_chunks, a.paced_ramp_s)
                            run_async(run)
                        _, err = spy.communicate(timeout=60)
                        if spy.returncode != 0 or not out.exists():
                            raise SystemExit(f"py-spy failed on {s.name}: {err.decode()[-2000:]}")
                        load_text = "non-stream, 16 clients" if load == "cpu" else f"{streams} paced streams"
                        print(pyspy.report(f"{s.name}, {load_text}", pyspy.load(out), a.profile_top))
            finally:
                up.stop()
        print(f"\nraw stacks (speedscope, flamegraph.pl): {out_dir}")


# ----------------------------------------------------------------------------------------------------------------
# Main


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arg: Callable[..., Any] = p.add_argument
    arg("--quick", action="store_true", help="a smoke run under a minute: small counts, one round")
    arg("--sections", default="upstreams,cpu,paced,hold,workers", help=f"any of {','.join(SECTIONS)}")
    arg("--rounds", type=int, default=3, help="alternated rounds; figures are medians over them")
    arg("--upstream", choices=("nginx", "fake"), default="nginx", help="canned answers from nginx, or fake_upstream.py")
    arg("--servers", default=",".join(SERVERS), help="compare only these (the floor is the ratios' base)")
    arg("--baseline", type=Path, default=None, help="a checkout of an earlier commit: adds baseline, baseline+quota")
    arg("--server-core", default="1", help="the core the server under test is pinned to")
    arg("--client-core", default="0", help="the core of the load generator, the upstream and Redis")
    arg("--levels", type=ints, default=[1, 16, 64], help="cpu: concurrent clients")
    arg("--requests", type=int, default=50000, help="cpu, workers: requests per run at most")
    arg("--seconds", type=float, default=2.5, help="cpu, workers: seconds per run at most")
    arg("--paced-streams", type=ints, default=[100, 500, 1000], help="paced: streams at once")
    arg("--paced-chunks", type=int, default=64, help="paced: chunks per stream (and one usage chunk)")
    arg("--pace-ms", type=float, default=5.0, help="paced: the upstream's gap between chunks")
    arg("--paced-ramp-s", type=float, default=0.1, help="paced: the streams' starts spread over this long")
    arg("--hold-streams", type=int, default=5000, help="hold: streams held by one process")
    arg("--hold-chunks", type=int, default=100, help="hold: chunks per stream")
    arg("--hold-pace-ms", type=float, default=200.0, help="hold: gap between chunks")
    arg("--hold-ramp-s", type=float, default=5.0, help="hold: the starts spread over this long")
    arg("--hold-rounds", type=int, default=2, help="hold: rounds (each is long)")
    arg("--worker-levels", type=ints, default=[16, 64], help="workers: concurrent clients")
    arg("--profile-s", type=float, default=8.0, help="profile: seconds recorded per server and load")
    arg("--profile-targets", default="gateway+quota,gateway,floor", help="profile: which servers")
    arg("--profile-top", type=int, default=20, help="profile: functions listed")
    arg("--profile-dir", type=Path, default=None, help="profile: where the raw stacks go (bench/results/...)")
    arg("--warmup", type=int, default=200, help="requests each server answers before it is measured")
    arg("--json", type=Path, default=None, metavar="OUT", help="write every run and figure as JSON")
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        quick = {
            "--rounds": ("rounds", 1), "--levels": ("levels", [1, 16]), "--requests": ("requests", 5000),
            "--seconds": ("seconds", 0.7), "--paced-streams": ("paced_streams", [50]),
            "--paced-chunks": ("paced_chunks", 16), "--paced-ramp-s": ("paced_ramp_s", 0.05), "--hold-streams": ("hold_streams", 300),
            "--hold-chunks": ("hold_chunks", 8), "--hold-rounds": ("hold_rounds", 1), "--hold-ramp-s": ("hold_ramp_s", 0.5),
            "--worker-levels": ("worker_levels", [16]), "--profile-s": ("profile_s", 2.0), "--warmup": ("warmup", 40),
        }  # fmt: skip
        for flag, (name, value) in quick.items():
            if flag not in given:
                setattr(args, name, value)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {','.join(SECTIONS)}")
    args.profile_targets = {t.strip() for t in args.profile_targets.split(",")}
    args.servers = {t.strip() for t in args.servers.split(",")}
    if args.servers - set(SERVERS):
        p.error(f"unknown servers {sorted(args.servers - set(SERVERS))}; known: {','.join(SERVERS)}")
    return args


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " (modified)" if git("status", "--porcelain", "--", "gateway") else ""
    )


def main() -> None:
    args = parse_args()
    cores = os.sched_getaffinity(0)
    for core in (args.server_core, args.client_core):
        if int(core) not in cores:
            raise SystemExit(f"core {core} is not available here (this process may use {sorted(cores)})")
    os.sched_setaffinity(0, {int(args.client_core)})  # the load generator; the servers get their own masks
    nofile = raise_nofile()
    machine = {
        "cores": psutil.cpu_count(),
        "python": platform.python_version(),
        "nofile": nofile,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"request path vs the floor: commit {machine['commit']}, {machine['date']}, {machine['cores']} cores, "
        f"Python {machine['python']}, load average {machine['loadavg_start'][0]:.2f}\n"
        f"pinning: the server under test on core {args.server_core}; the load generator (this process), the "
        f"{args.upstream} upstream and Redis on core {args.client_core} (workers: the gateway free on both); "
        f"RLIMIT_NOFILE {nofile}, inherited by every server\nsections {','.join(args.sections)}, rounds {args.rounds}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="request-path-") as tmp:
        bench = Bench(args, Path(tmp))
        for section in args.sections:
            print(f"\n== {section}", flush=True)
            t0 = time.monotonic()
            getattr(bench, f"section_{section}")()
            print(f"  ({section}: {time.monotonic() - t0:.0f} s)", flush=True)
    machine["loadavg_end"] = os.getloadavg()
    figures = summarize(bench.runs)
    print_figures(figures, args, bench.idle_ms_per_s, bench.notes, machine)
    if args.json:
        doc = {
            "machine": machine,
            "args": {
                k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
            },
            "idle_cpu_ms_per_s": bench.idle_ms_per_s,
            "notes": bench.notes,
            "figures": figures,
            "runs": [asdict(r) for r in bench.runs],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
