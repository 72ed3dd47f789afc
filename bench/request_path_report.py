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
        "client_core_busy": med([r.client_core_busy for r in runs]),
        "failures": sum(r.failures for r in runs),
        "units": sum(r.units for r in runs),
    }
    if base:
        cell["cpu_ratio_to_floor"] = _ratio(table, n, server, base, "cpu_ms")
    if runs[0].section in ("paced", "hold", "upstreams-sse"):
        cell["held_min"] = min(r.held for r in runs)
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


def _grid(runs: list[Run], section: str, base: str | None) -> dict[str, dict[str, Any]]:
    """clients -> server -> cell, in the order first measured."""
    table = _by_round(runs, section)
    grid: dict[str, dict[str, Any]] = {}
    for n, server in table:
        grid.setdefault(str(n), {})[server] = _cell(table, n, server, base if base and (n, base) in table else None)
    return grid


def summarize(runs: list[Run]) -> Figures:
    figures: Figures = {}
    if any(r.section.startswith("upstreams") for r in runs):
        figures["upstreams"] = {
            "json": _grid(runs, "upstreams-json", None),
            "sse": _grid(runs, "upstreams-sse", None),
        }
    if any(r.section == "cpu" for r in runs):
        figures["1_cpu_per_request"] = _grid(runs, "cpu", "floor")
        table = _by_round(runs, "cpu")
        figures["3_rps_vs_litellm"] = {
            str(n): {
                "gateway+quota_rps": med([r.rps for r in table[(n, "gateway+quota")].values()]),
                "gateway_rps": med([r.rps for r in table[(n, "gateway")].values()]),
                "litellm_rps": med([r.rps for r in table[(n, "litellm")].values()]),
                "gateway+quota_over_litellm": _ratio(table, n, "gateway+quota", "litellm", "rps"),
                "gateway_over_litellm": _ratio(table, n, "gateway", "litellm", "rps"),
            }
            for n, server in table
            if server == "litellm" and (n, "gateway+quota") in table
        }
    if any(r.section == "paced" for r in runs):
        figures["2_cpu_per_chunk"] = _grid(runs, "paced", "floor")
    if any(r.section == "hold" for r in runs):
        hold = _grid(runs, "hold", "floor")
        for row in hold.values():
            floor_peak = row.get("floor", {}).get("rss_peak_mib")
            for cell in row.values():
                cell["rss_peak_ratio_to_floor"] = cell["rss_peak_mib"] / floor_peak if floor_peak else None
        figures["4_hold"] = hold
    if any(r.section == "workers" for r in runs):
        table = _by_round(runs, "workers")
        workers: Figures = {}
        for n, server in table:
            if not server.endswith(" w2"):
                continue
            base = server[: -len(" w2")]
            w1, w2 = table.get((n, base + " w1"), {}), table[(n, server)]
            workers.setdefault(str(n), {})[base] = {
                "w1_rps": med([r.rps for r in w1.values()]),
                "w2_rps": med([r.rps for r in w2.values()]),
                "w2_over_w1": _ratio(table, n, server, base + " w1", "rps"),
                "w1_cpu_ms": med([r.cpu_ms for r in w1.values()]),
                "w2_cpu_ms": med([r.cpu_ms for r in w2.values()]),
                "w1_client_core_busy": med([r.client_core_busy for r in w1.values()]),
                "w2_client_core_busy": med([r.client_core_busy for r in w2.values()]),
                "failures": sum(r.failures for r in [*w1.values(), *w2.values()]),
            }
        figures["5_workers"] = workers
    return figures


def _x(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def print_figures(
    figures: Figures, args: argparse.Namespace, idle: dict[str, float], notes: list[str], machine: dict[str, Any]
) -> None:
    print(
        f"\n=== medians of {args.rounds} round(s); load average {machine['loadavg_start'][0]:.2f} at the start, "
        f"{machine['loadavg_end'][0]:.2f} at the end; server under test on core {args.server_core}, load generator, "
        f"upstream ({args.upstream}) and Redis on core {args.client_core} ==="
    )
    if idle:
        print("idle CPU while the others were measured (ms/s): " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    if "upstreams" in figures:
        print("\nUpstreams alone: CPU per whole answer (16 clients) and per paced chunk")
        for kind in figures["upstreams"]["json"].get("16", {}):
            j = figures["upstreams"]["json"]["16"][kind]
            sse = next(iter(figures["upstreams"]["sse"].values()))[kind]
            print(f"  {kind:<6} {j['cpu_ms']:.4f} ms/request ({j['rate']:.0f} req/s)  {sse['cpu_ms']:.4f} ms/chunk")
    if "1_cpu_per_request" in figures:
        grid = figures["1_cpu_per_request"]
        names = list(next(iter(grid.values())))
        print("\nFigure 1. CPU per non-stream request, ms (ratio to the floor); gateway+quota includes Redis's CPU")
        print(f"{'clients':>7}  " + "".join(f"{n:>24}" for n in names))
        for n, row in grid.items():
            cells = [
                f"{c['cpu_ms']:.4f}" + (f" ({_x(c.get('cpu_ratio_to_floor'))})" if s not in ("floor", "direct") else "")
                for s, c in row.items()
            ]
            print(f"{n:>7}  " + "".join(f"{c:>24}" for c in cells))
        quota = [row["gateway+quota"]["redis_cpu_ms"] for row in grid.values() if "gateway+quota" in row]
        if quota:
            print("  of which Redis, gateway+quota: " + ", ".join(f"{q:.4f}" for q in quota) + " ms")
        print(f"req/s (and how busy core {args.client_core} was: the load generator, the upstream and Redis):")
        for n, row in grid.items():
            print(f"{n:>7}  " + "".join(f"{c['rate']:>17.0f} ({c['client_core_busy']:>4.0%})" for c in row.values()))
    if "2_cpu_per_chunk" in figures:
        print(
            f"\nFigure 2. CPU per chunk, paced streams ({args.pace_ms:g} ms apart, {args.paced_chunks} chunks + usage)"
        )
        print(
            f"{'streams':>7} {'server':<16}{'ms/chunk':>10}{'x floor':>9}{'chunks/s':>10}{'gap p50':>9}{'p99 ms':>8}  done"
        )
        for n, row in figures["2_cpu_per_chunk"].items():
            for s, c in row.items():
                ratio = _x(c.get("cpu_ratio_to_floor")) if s not in ("floor", "direct") else ""
                print(
                    f"{n:>7} {s:<16}{c['cpu_ms']:>10.4f}{ratio:>9}{c['rate']:>10.0f}{c['p50_ms']:>9.1f}"
                    f"{c['p99_ms']:>8.1f}  {c['completed']}/{c['started']}"
                )
    if "3_rps_vs_litellm" in figures:
        print("\nFigure 3. req/s, 1 worker each on the same core: gateway+quota vs LiteLLM (master key only)")
        print(
            f"{'clients':>7}{'gw+quota':>10}{'gateway':>9}{'litellm':>9}{'gw+quota/litellm':>18}{'gateway/litellm':>17}"
        )
        for n, c in figures["3_rps_vs_litellm"].items():
            print(
                f"{n:>7}{c['gateway+quota_rps']:>10.0f}{c['gateway_rps']:>9.0f}{c['litellm_rps']:>9.1f}"
                f"{_x(c['gateway+quota_over_litellm']):>18}{_x(c['gateway_over_litellm']):>17}"
            )
    if "4_hold" in figures:
        print(f"\nFigure 4. {args.hold_streams} paced streams ({args.hold_pace_ms:g} ms apart) held by one process")
        print(f"{'server':<16}{'held':>6}{'completed':>12}  {'RSS MiB before':>15}{'peak':>7}{'x floor':>9}  errors")
        for row in figures["4_hold"].values():
            for s, c in row.items():
                print(
                    f"{s:<16}{c['held_min']:>6}{c['completed']:>6}/{c['started']:<5}  {c['rss_before_mib']:>15.1f}"
                    f"{c['rss_peak_mib']:>7.1f}{_x(c['rss_peak_ratio_to_floor']):>9}  {c['errors'] or 0}"
                )
    if "5_workers" in figures:
        print(
            f"\nFigure 5. --workers 2 vs 1, the gateway free on cores {args.client_core},{args.server_core}"
            f" (the load generator, upstream and Redis on core {args.client_core})"
        )
        print(
            f"{'clients':>7} {'server':<15}{'w1 req/s':>9}{'w2 req/s':>9}{'w2/w1':>7}{'CPU ms w1':>10}{'w2':>7}{'client core':>12}"
        )
        for n, row in figures["5_workers"].items():
            for s, c in row.items():
                print(
                    f"{n:>7} {s:<15}{c['w1_rps']:>9.0f}{c['w2_rps']:>9.0f}{_x(c['w2_over_w1']):>7}"
                    f"{c['w1_cpu_ms']:>10.4f}{c['w2_cpu_ms']:>7.4f}{c['w2_client_core_busy']:>12.0%}"
                )
    for note in notes:
        print(f"note: {note}")
