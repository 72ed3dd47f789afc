"""Where a worker of `--workers 2` spends its time against the one worker of `--workers 1`: py-spy on both
gateways (and on those of another checkout with --baseline), under the same non-stream closed loop, one after
the other, each after a warm-up. Prints each profile's top functions and the share of prometheus_client.

Set-up as bench/request_path.py's `workers` section: nginx's canned answers on core 0 with the load generator,
the gateways free on both cores (py-spy samples every worker: --subprocesses).

    .venv/bin/python bench/profile_workers.py [--quota] [--baseline /path/to/checkout] [--seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench import servers
from bench.gateway_overhead import run_async
from bench.request_path_runs import closed_run, started, warm_up
from testkit import pyspy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quota", action="store_true", help="keys and quotas on (a private Redis)")
    p.add_argument("--baseline", type=Path, default=None, help="also profile the gateway of this checkout")
    p.add_argument("--seconds", type=float, default=10.0, help="recorded per gateway")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="profile-workers-"))
    up = servers.start_upstream("nginx", tmp, chunks=32, pace_ms=0, cpus="0")
    trees = [("gateway", None)] + ([("baseline", a.baseline)] if a.baseline else [])
    try:
        group = [
            servers.gateway(
                tmp,
                up.json_url,
                "0,1",
                workers=w,
                name=f"{label} w{w}",
                tree=tree,
                quota=servers.RedisServer(tmp, "0") if a.quota else None,
            )
            for label, tree in trees
            for w in (1, 2)
        ]
        with started(*group):
            warm_up(group, partial(closed_run, "warmup", upstream=up, round_=0, clients=16, requests=400, seconds=5))
            shares = []
            for s in group:
                out = tmp / f"{s.name.replace(' ', '-')}.txt"
                spy = pyspy.record(s.process.pid, a.seconds, out, cpus="0")
                deadline = time.monotonic() + a.seconds + 0.5
                while time.monotonic() < deadline:  # loaded for the whole recording
                    run_async(partial(closed_run, "profile", s, up, 0, a.clients, 10**9, deadline - time.monotonic()))
                spy.wait()
                profile = pyspy.load(out)
                print(pyspy.report(s.name, profile, a.top), flush=True)
                share = profile.package_self["prometheus_client"] / max(profile.samples, 1)
                shares.append(f"{s.name}: {share:.1%}")
            print("\nprometheus_client's share of the samples: " + ", ".join(shares))
            print(f"raw stacks: {tmp}")
    finally:
        up.stop()


if __name__ == "__main__":
    main()
