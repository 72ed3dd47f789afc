"""The figures of bench/request_path.py: medians over rounds, ratios to the floor, and their tables.

A ratio is the median over rounds of that round's own ratio (server / floor, measured minutes apart at
most), not the ratio of two medians: the pair shares its round's noise on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.request_path import Run

Figures = dict[str, Any]
# Tables list the floor first, then the gateway variants, LiteLLM, and the upstream alone.
ORDER = (
    "floor",
    "gateway",
    "gateway+quota",
    "baseline",
    "baseline+quota",
    "sglang",
    "litellm",
    "direct",
    "fake",
    "nginx",
)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _by_round(runs: list[Run], section: str) -> dict[tuple[int, str], dict[int, Run]]:
    """(clients, server) -> round -> run."""
    out: dict[tuple[int, str], dict[int, Run]] = defaultdict(dict)
    for r in runs:
        if r.section == section:
            out[(r.clients, r.server)][r.round] = r
    return out


def _ratio(table: dict[tuple[int, str], dict[int, Run]], n: int, server: str, base: str, attr: str) -> float | None:
    mine, theirs = table.get((n, server), {}), table.get((n, base), {})
    pairs = [
        getattr(mine[k], attr) / getattr(theirs[k], attr) for k in mine if k in theirs and getattr(theirs[k], attr)
    ]
    return med(pairs) if pairs else None


def _inverse(ratio: float | None) -> float | None:
    return 1 / ratio if ratio else None


def _cell(table: dict[tuple[int, str], dict[int, Run]], n: int, server: str, base: str | None) -> dict[str, Any]:
    runs = list(table[(n, server)].values())
    cell: dict[str, Any] = {
        "rounds": len(runs),
        "cpu_ms": med([r.cpu_ms for r in runs]),
        "redis_cpu_ms": med([r.redis_cpu_ms for r in runs]),
        "upstream_cpu_ms": med([r.upstream_cpu_ms for r in runs]),
        "rate": med([r.rps for r in runs]),
        "p50_ms": med([r.p50_ms for r in runs]),
        "p99_ms": med([r.p99_ms for r in runs]),
        "redis_cmds": med([r.redis_cmds for r in runs]),
        "client_core_busy": med([r.client_core_busy for r in runs]),
        "failures": sum(r.failures for r in runs),
        "units": sum(r.units for r in runs),
    }
    if base:
        cell["cpu_ratio_to_floor"] = _ratio(table, n, server, base, "cpu_ms")
    if runs[0].section in ("paced", "hold", "upstreams-sse"):
        cell["held_min"] = min(r.held for r in runs)
        cell["held_by_round"] = [r.held for r in sorted(runs, key=lambda r: r.round)]
        cell["completed"] = sum(r.completed for r in runs)
        cell["started"] = sum(r.clients for r in runs)
        errors: dict[str, int] = defaultdict(int)
        for r in runs:
            for why, count in r.errors.items():
                errors[why] += count
        cell["errors"] = dict(errors)
        cell["rss_before_mib"] = min(r.rss_before_mib for r in runs)
        cell["rss_peak_mib"] = max(r.rss_peak_mib for r in runs)
    return cell


def _order(server: str) -> tuple[int, str]:
    for i, name in enumerate(ORDER):
        if server == name or server.startswith(name + " "):
            return i, server
    return len(ORDER), server


def _grid(runs: list[Run], section: str, base: str | None) -> dict[str, dict[str, Any]]:
    """clients -> server -> cell; clients ascending, servers in ORDER."""
    table = _by_round(runs, section)
    grid: dict[str, dict[str, Any]] = {}
    for n, server in sorted(table, key=lambda key: (key[0], _order(key[1]))):
        grid.setdefault(str(n), {})[server] = _cell(table, n, server, base if base and (n, base) in table else None)
    return grid


def _versus_litellm(runs: list[Run]) -> Figures:
    """Measured req/s follow the share of the core each server got from the machine's other work; requests
    per CPU-second (1 / CPU per request: what a whole core would serve) vary far less."""
    table = _by_round(runs, "cpu")
    out: Figures = {}
    for n in sorted({n for n, server in table if server == "litellm"}):
        if (n, "gateway+quota") not in table or (n, "gateway") not in table:
            continue
        out[str(n)] = {
            "gateway+quota_rps": med([r.rps for r in table[(n, "gateway+quota")].values()]),
            "gateway_rps": med([r.rps for r in table[(n, "gateway")].values()]),
            "litellm_rps": med([r.rps for r in table[(n, "litellm")].values()]),
            "gateway+quota_over_litellm": _ratio(table, n, "gateway+quota", "litellm", "rps"),
            "gateway_over_litellm": _ratio(table, n, "gateway", "litellm", "rps"),
            "gateway+quota_over_litellm_per_cpu": _inverse(_ratio(table, n, "gateway+quota", "litellm", "cpu_ms")),
            "gateway_over_litellm_per_cpu": _inverse(_ratio(table, n, "gateway", "litellm", "cpu_ms")),
        }
    return out


def _per_worker_ratio(table: dict[tuple[int, str], dict[int, Run]], n: int, w2: str, w1: str) -> float | None:
    """CPU per request of `w2` at n clients over `w1`'s at n/2, round by round: each of two workers
    holds about n/2 connections, and a process's CPU per request falls as its concurrency grows
    (more work per loop wake-up), so this pair compares workers under the same load each."""
    mine, theirs = table.get((n, w2), {}), table.get((n // 2, w1), {})
    pairs = [mine[k].cpu_ms / theirs[k].cpu_ms for k in mine if k in theirs and theirs[k].cpu_ms]
    return med(pairs) if pairs and n % 2 == 0 else None


def _workers(runs: list[Run]) -> Figures:
    table = _by_round(runs, "workers")
    out: Figures = {}
    for n, server in sorted(table, key=lambda key: (key[0], _order(key[1]))):
        if not server.endswith(" w2"):
            continue
        base = server.removesuffix(" w2")
        w1, w2 = table.get((n, base + " w1"), {}), table[(n, server)]
        out.setdefault(str(n), {})[base] = {
            "w1_rps": med([r.rps for r in w1.values()]),
            "w2_rps": med([r.rps for r in w2.values()]),
            "w2_over_w1": _ratio(table, n, server, base + " w1", "rps"),
            "w1_cpu_ms": med([r.cpu_ms for r in w1.values()]),
            "w2_cpu_ms": med([r.cpu_ms for r in w2.values()]),
            "cpu_w2_over_w1": _ratio(table, n, server, base + " w1", "cpu_ms"),
            "cpu_w2_over_w1_half": _per_worker_ratio(table, n, server, base + " w1"),
            "w1_p50_ms": med([r.p50_ms for r in w1.values()]),
            "w2_p50_ms": med([r.p50_ms for r in w2.values()]),
            "w1_p99_ms": med([r.p99_ms for r in w1.values()]),
            "w2_p99_ms": med([r.p99_ms for r in w2.values()]),
            "w1_client_core_busy": med([r.client_core_busy for r in w1.values()]),
            "w2_client_core_busy": med([r.client_core_busy for r in w2.values()]),
            "failures": sum(r.failures for r in [*w1.values(), *w2.values()]),
        }
    return out


def summarize(runs: list[Run]) -> Figures:
    sections = {r.section for r in runs}
    figures: Figures = {}
    if "upstreams-json" in sections:
        figures["upstreams"] = {"json": _grid(runs, "upstreams-json", None), "sse": _grid(runs, "upstreams-sse", None)}
    if "cpu" in sections:
        figures["1_cpu_per_request"] = _grid(runs, "cpu", "floor")
        figures["3_rps_vs_litellm"] = _versus_litellm(runs)
    if "paced" in sections:
        figures["2_cpu_per_chunk"] = _grid(runs, "paced", "floor")
    if "hold" in sections:
        hold = _grid(runs, "hold", "floor")
        for row in hold.values():
            floor_peak = row.get("floor", {}).get("rss_peak_mib")
            for cell in row.values():
                cell["rss_peak_ratio_to_floor"] = cell["rss_peak_mib"] / floor_peak if floor_peak else None
        figures["4_hold"] = hold
    if "workers" in sections:
        figures["5_workers"] = _workers(runs)
    if any(r.server == "gateway-noresume" for r in runs):
        figures["6_resume_cost"] = _resume_cost(runs)
    return figures


def _resume_cost(runs: list[Run]) -> Figures:
    """Streams that can be resumed (`gateway`: each keeps a transcript) against `gateway-noresume`
    (`failover: error`), per section and stream count: the median of each round's own CPU ratio,
    and for held streams the difference of peak RSS per stream."""
    out: Figures = {}
    for section in ("paced", "hold"):
        table = _by_round(runs, section)
        for n in sorted({n for n, server in table if server == "gateway-noresume"}):
            if (n, "gateway") not in table:
                continue
            on, off = table[(n, "gateway")], table[(n, "gateway-noresume")]
            rss = [(on[k].rss_peak_mib - off[k].rss_peak_mib) * 1024 / n for k in on if k in off]
            out[f"{section} {n}"] = {
                "cpu_ratio": _ratio(table, n, "gateway", "gateway-noresume", "cpu_ms"),
                "cpu_ratios_by_round": [on[k].cpu_ms / off[k].cpu_ms for k in sorted(on) if k in off and off[k].cpu_ms],
                "rss_peak_kib_per_stream": med(rss) if section == "hold" else None,
            }
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _x(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def _rounds(values: list[int]) -> str:
    return ", ".join(map(str, values))


def print_upstreams(figures: Figures) -> None:
    print("\nUpstreams alone: CPU per whole answer (16 clients) and per paced chunk")
    sse: Figures = next(iter(figures["sse"].values()), {})
    for kind, j in figures["json"].get("16", {}).items():
        chunk = f"{sse[kind]['cpu_ms']:.4f} ms/chunk" if kind in sse else ""
        print(f"  {kind:<6} {j['cpu_ms']:.4f} ms/request ({j['rate']:.0f} req/s)  {chunk}")


def print_cpu(grid: Figures, client_core: str) -> None:
    names = sorted({s for row in grid.values() for s in row}, key=_order)
    print("\nFigure 1. CPU per non-stream request, ms (ratio to the floor); gateway+quota includes Redis's CPU")
    print(f"{'clients':>7}" + "".join(f"{n:>22}" for n in names))
    for n, row in grid.items():
        cells = []
        for s in names:
            c = row.get(s)
            ratio = f" ({_x(c.get('cpu_ratio_to_floor'))})" if c and s not in ("floor", "direct") else ""
            cells.append(f"{c['cpu_ms']:.4f}{ratio}" if c else "-")
        print(f"{n:>7}" + "".join(f"{c:>22}" for c in cells))
    quota = [f"c={n} {row['gateway+quota']['redis_cpu_ms']:.4f}" for n, row in grid.items() if "gateway+quota" in row]
    if quota:
        print("  of which Redis, in gateway+quota: " + ", ".join(quota) + " ms")
    keyed = [s for s in names if "quota" in s]
    for s in keyed:
        cmds = [f"c={n} {row[s]['redis_cmds']:.2f}" for n, row in grid.items() if s in row]
        print(f"  Redis commands per request, {s}: " + ", ".join(cmds))
    print("latency p50 / p99, ms")
    for n, row in grid.items():
        cells = [f"{row[s]['p50_ms']:.2f} / {row[s]['p99_ms']:.2f}" if s in row else "-" for s in names]
        print(f"{n:>7}" + "".join(f"{c:>22}" for c in cells))
    print(f"req/s (how busy core {client_core} was: the load generator, the upstream and Redis)")
    for n, row in grid.items():
        cells = [f"{row[s]['rate']:.0f} ({row[s]['client_core_busy']:.0%})" if s in row else "-" for s in names]
        print(f"{n:>7}" + "".join(f"{c:>22}" for c in cells))


def print_paced(grid: Figures, pace_ms: float, chunks: int) -> None:
    print(f"\nFigure 2. CPU per chunk, paced streams ({pace_ms:g} ms apart, {chunks} chunks + usage), started together")
    print(
        f"{'streams':>7} {'server':<15}{'ms/chunk':>9}{'x floor':>8}{'chunks/s':>9}{'gap p50':>8}{'p99 ms':>7}"
        f"  {'held at once':<19}done"
    )
    for n, row in grid.items():
        for s, c in row.items():
            ratio = _x(c.get("cpu_ratio_to_floor")) if s not in ("floor", "direct") else ""
            print(
                f"{n:>7} {s:<15}{c['cpu_ms']:>9.4f}{ratio:>8}{c['rate']:>9.0f}{c['p50_ms']:>8.1f}{c['p99_ms']:>7.1f}"
                f"  {_rounds(c['held_by_round']):<19}{c['completed']}/{c['started']}"
            )


def print_versus_litellm(table: Figures) -> None:
    print("\nFigure 3. gateway+quota vs LiteLLM (master key only), 1 worker each on the same core")
    print(
        f"{'clients':>7}{'req/s gw+quota':>15}{'gateway':>9}{'litellm':>9}{'gw+quota/litellm':>18}"
        f"{'gateway/litellm':>17}{'per CPU-s: gw+quota/litellm':>29}{'gateway/litellm':>17}"
    )
    for n, c in table.items():
        print(
            f"{n:>7}{c['gateway+quota_rps']:>15.0f}{c['gateway_rps']:>9.0f}{c['litellm_rps']:>9.1f}"
            f"{_x(c['gateway+quota_over_litellm']):>18}{_x(c['gateway_over_litellm']):>17}"
            f"{_x(c['gateway+quota_over_litellm_per_cpu']):>29}{_x(c['gateway_over_litellm_per_cpu']):>17}"
        )


def print_hold(grid: Figures, streams: int, pace_ms: float) -> None:
    print(f"\nFigure 4. {streams} paced streams ({pace_ms:g} ms apart) held by one process")
    print(f"{'server':<15}{'held at once':>14}{'completed':>14}{'RSS MiB before':>16}{'peak':>7}{'x floor':>9}  errors")
    for row in grid.values():
        for s, c in row.items():
            print(
                f"{s:<15}{_rounds(c['held_by_round']):>14}{c['completed']:>8}/{c['started']:<5}"
                f"{c['rss_before_mib']:>16.1f}{c['rss_peak_mib']:>7.1f}{_x(c['rss_peak_ratio_to_floor']):>9}"
                f"  {c['errors'] or 0}"
            )


def print_workers(table: Figures, client_core: str, server_core: str) -> None:
    print(
        f"\nFigure 5. --workers 2 vs 1, the gateway free on cores {client_core},{server_core}"
        f" (the load generator, the upstream and Redis pinned to core {client_core});"
        " w2/w1@n/2: w2 at n clients over w1 at n/2, the same load per worker"
    )
    print(
        f"{'clients':>7} {'server':<16}{'w1 req/s':>9}{'w2 req/s':>9}{'w2/w1':>7}{'CPU ms/req w1':>14}{'w2':>7}"
        f"{'CPU w2/w1':>10}{'w2/w1@n/2':>10}{'p50 ms w1':>10}{'w2':>6}{'p99 ms w1':>10}{'w2':>8}"
    )
    for n, row in table.items():
        for s, c in row.items():
            print(
                f"{n:>7} {s:<16}{c['w1_rps']:>9.0f}{c['w2_rps']:>9.0f}{_x(c['w2_over_w1']):>7}"
                f"{c['w1_cpu_ms']:>14.4f}{c['w2_cpu_ms']:>7.4f}{_x(c['cpu_w2_over_w1']):>10}"
                f"{_x(c['cpu_w2_over_w1_half']):>10}"
                f"{c['w1_p50_ms']:>10.2f}{c['w2_p50_ms']:>6.2f}{c['w1_p99_ms']:>10.2f}{c['w2_p99_ms']:>8.2f}"
            )


def print_figures(
    figures: Figures, args: argparse.Namespace, idle: dict[str, float], notes: list[str], machine: dict[str, Any]
) -> None:
    print(
        f"\n=== medians of {args.rounds} round(s) ({args.hold_rounds} for figure 4); load average "
        f"{machine['loadavg_start'][0]:.2f} at the start, {machine['loadavg_end'][0]:.2f} at the end; server under "
        f"test on core {args.server_core}; load generator, upstream ({args.upstream}) and Redis on core "
        f"{args.client_core} ==="
    )
    if idle:
        print("idle CPU while the others were measured (ms/s): " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    if "upstreams" in figures:
        print_upstreams(figures["upstreams"])
    if "1_cpu_per_request" in figures:
        print_cpu(figures["1_cpu_per_request"], args.client_core)
    if "2_cpu_per_chunk" in figures:
        print_paced(figures["2_cpu_per_chunk"], args.pace_ms, args.paced_chunks)
    if figures.get("3_rps_vs_litellm"):
        print_versus_litellm(figures["3_rps_vs_litellm"])
    if "4_hold" in figures:
        print_hold(figures["4_hold"], args.hold_streams, args.hold_pace_ms)
    if "5_workers" in figures:
        print_workers(figures["5_workers"], args.client_core, args.server_core)
    if "6_resume_cost" in figures:
        print("\nFigure 6. Resume on (`gateway`) vs off (`gateway-noresume`, failover: error), same run")
        for where, f in figures["6_resume_cost"].items():
            rounds = ", ".join(f"{r:.3f}" for r in f["cpu_ratios_by_round"])
            memory = f["rss_peak_kib_per_stream"]
            extra = f"; peak RSS {memory:+.1f} KiB per stream" if memory is not None else ""
            print(f"  {where:<12} CPU per chunk {_x(f['cpu_ratio'])} (rounds: {rounds}){extra}")
    for note in notes:
        print(f"note: {note}")
