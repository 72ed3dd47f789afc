"""`llm-gateway report MODEL [--since T] [--until T] [--baseline-since T] [--baseline-until T]`:
the model report of the admin API (`GET /admin/models/{name}/report`) printed as tables."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

import httpx

from gateway.settings import admin_client_settings

# (heading, field, format) per column of the routes table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("route", "route", "s"),
    ("requests", "requests", "d"),
    ("errors", "error_rate", "%"),
    ("ttft p50", "ttft_p50", "ms"),
    ("ttft p95", "ttft_p95", "ms"),
    ("lat p50", "latency_p50", "ms"),
    ("lat p95", "latency_p95", "ms"),
    ("out tok/s", "output_tokens_per_second", ".1f"),
    ("prompt avg", "mean_prompt_tokens", ".1f"),
    ("compl avg", "mean_completion_tokens", ".1f"),
    ("prompt sum", "prompt_tokens", "d"),
    ("compl sum", "completion_tokens", "d"),
)


def add_report_command(sub: Any) -> None:
    p = sub.add_parser("report", help="compare a model's routes (versions) and show drift, from the inference log")
    p.add_argument("model")
    p.add_argument("--url", help="the gateway (default: $GATEWAY_URL or http://127.0.0.1:8080)")
    p.add_argument("--since", help="window start, ISO 8601 or Unix seconds (default: an hour before --until)")
    p.add_argument("--until", help="window end (default: now)")
    p.add_argument("--baseline-since", help="baseline start (default: a window as long, just before)")
    p.add_argument("--baseline-until", help="baseline end (default: --since)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url, admin_key = admin_client_settings(args.url)
    if not admin_key:
        print("llm-gateway report: set GATEWAY_ADMIN_KEY to the gateway's admin key", file=sys.stderr)
        return 2
    params = {
        name: value
        for name in ("since", "until", "baseline_since", "baseline_until")
        if (value := getattr(args, name)) is not None
    }
    try:
        r = httpx.get(
            f"{url}/admin/models/{quote(args.model, safe='')}/report",
            params=params,
            headers={"authorization": f"Bearer {admin_key}"},
            timeout=120,
        )
    except httpx.HTTPError as exc:
        print(f"llm-gateway report: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    try:
        payload: dict[str, Any] = r.json()
    except ValueError:
        payload = {}
    if r.status_code >= 400 or not payload:
        message = payload.get("error", {}).get("message") if payload else r.text
        print(f"llm-gateway report: {r.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2) if args.json else format_report(payload))
    return 0


def format_report(report: dict[str, Any]) -> str:
    w, b = report["window"], report["baseline"]
    lines = [
        f"model {report['model']}: {w['since']} .. {w['until']} (baseline {b['since']} .. {b['until']})",
        "",
        *_table(
            [h for h, _, _ in COLUMNS], [[_cell(r.get(f), fmt) for _, f, fmt in COLUMNS] for r in report["routes"]]
        ),
        "",
        "finish reasons:",
    ]
    for r in report["routes"]:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["finish_reason_mix"].items()) or "-"
        lines.append(f"  {r['route']}: {mix}")
    lines += ["", "drift (PSI, baseline -> window; flagged above 0.2):"]
    rows = []
    for name, d in report["drift"].items():
        psi = "-" if d["psi"] is None else f"{d['psi']:.3f}"
        flag = "DRIFT" if d["drifted"] else ("no data" if d["psi"] is None else "ok")
        rows.append([name, psi, flag, str(d["baseline_count"]), str(d["current_count"])])
    lines += _table(["feature", "psi", "", "baseline n", "window n"], rows)
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{value * 1000:.1f}ms"
    if fmt == "%":
        return f"{value:.1%}"
    return format(value, fmt)


def _table(headings: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headings)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    return [line(headings), *(line(r) for r in rows)]
