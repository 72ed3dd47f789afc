"""A soak of hostile requests (issue 9): 10,000 by default, drawn from the strategies of the fuzz
suite (testkit/hostile.py) by Hypothesis, against the same setup (testkit/fuzz_rig.py: two gateway
replicas with keys on over one private redis-server, one SQLite store, a fast fake engine).

Nothing stops at the first bad answer: it counts answers by status (and by error code for every
status >= 400), keeps the first example of every problem (a 500, a status >= 500 other than
503/504 with their documented codes, an error not in OpenAI's shape, a missing x-request-id, a
request the gateway did not answer), measures each replica's RSS (main process and workers)
before and after, and runs the after-checks: both replicas healthy and ready, the key list and
model routes readable on both, no traceback in their logs. Exits 1 when anything was wrong.

    .venv/bin/python bench/soak.py [--cases 10000] [--seed 9] [--concurrency 8] [--json soak.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.fuzz_rig import after_checks, rig
from testkit.procs import free_port
from testkit.redis_server import RedisServer
from testkit.soak import soak


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['requests']} hostile requests, {report['concurrency']} at a time, in {report['seconds']} s"]
    lines.append("by status: " + ", ".join(f"{k}: {v}" for k, v in report["by_status"].items()))
    lines += [f"  {code}: {n}" for code, n in report["by_error_code"].items()]
    for sent, sample in report["rss_mib"].items():
        lines.append(
            f"RSS MiB after {sent:>6}: " + " | ".join(", ".join(f"{k} {v}" for k, v in r.items()) for r in sample)
        )
    lines.append(f"problems: {report['problems']}")
    lines += [f"  {example}" for example in report["problem_examples"].values()]
    lines.append("after-checks: " + ("all passed" if not report["after_checks"] else ""))
    lines += [f"  {t[:2000]}" for t in report["after_checks"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--logs", type=Path, help="keep the processes' logs in this folder (default: a temporary one)")
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("soak: redis-server is not on PATH (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(binary, free_port(), logs).start()
        try:
            with rig(logs, redis, name="soak") as (world, replicas):
                tally, seconds = soak(world, replicas, args.cases, args.seed, args.concurrency)
                trouble = after_checks(world, replicas)
        finally:
            redis.stop()
    report: dict[str, Any] = {
        "requests": sum(tally.by_status.values()),
        "concurrency": args.concurrency,
        "seconds": round(seconds, 1),
        "by_operation": dict(tally.by_op.most_common()),
        "by_status": {str(k): v for k, v in sorted(tally.by_status.items())},
        "by_error_code": dict(sorted(tally.by_code.items())),
        "rss_mib": {str(sent): sample for sent, sample in tally.rss},
        "problems": tally.problem_count,
        "problem_examples": tally.problems,
        "after_checks": trouble,
    }
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    sys.exit(1 if tally.problem_count or trouble else 0)


if __name__ == "__main__":
    main()
