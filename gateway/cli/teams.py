"""`llm-gateway teams|orgs create|list|get|update|delete|usage` and `llm-gateway spend`: teams,
organizations and spend through the admin API (GATEWAY_ADMIN_KEY, or a provider's access token in
GATEWAY_ADMIN_TOKEN)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from gateway.cli.keys import LIMITS, connection_options, request
from gateway.settings import admin_client_settings, admin_token

BUDGETS = ("daily_budget", "monthly_budget")


def add_team_commands(sub: Any) -> None:
    for noun, path in (("teams", "/admin/teams"), ("orgs", "/admin/orgs")):
        p = sub.add_parser(noun, help=f"manage {noun} through the admin API")
        connection_options(p, default=True)
        ops = p.add_subparsers(dest="op", required=True)
        create = ops.add_parser("create")
        create.add_argument("--name", required=True)
        if noun == "teams":
            create.add_argument("--org", help="the organization's id (fixed once the team is made)")
        update = ops.add_parser("update")
        update.add_argument("id")
        update.add_argument("--name")
        parsers = [create, update, ops.add_parser("list")]
        for op in ("get", "delete", "usage", *(("keys",) if noun == "teams" else ())):
            parsers.append(ops.add_parser(op))
            parsers[-1].add_argument("id")
        for q in (create, update):
            for name in (*LIMITS, *BUDGETS):
                kind = float if name in BUDGETS else int
                q.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
            q.add_argument("--models", help="comma-separated public model names (default: all)")
            q.add_argument("--metadata", help="a JSON object")
        for q in parsers:
            connection_options(q, default=False)
        p.set_defaults(func=run, path=path, noun=noun)
    s = sub.add_parser("spend", help="spend over a window, grouped (GET /admin/spend)")
    connection_options(s, default=True)
    s.add_argument("--group-by", default="team,model,day", help="some of key,team,org,model,route,day,hour")
    s.add_argument("--since", help="ISO 8601 or Unix seconds (default: 31 days ago)")
    s.add_argument("--until", help="ISO 8601 or Unix seconds (default: now)")
    for name in ("team", "key", "org", "model"):
        s.add_argument(f"--{name}", help=f"only this {name}")
    s.add_argument("--format", choices=("table", "json", "csv"), default="table")
    s.set_defaults(func=spend)


def _headers(prog: str) -> dict[str, str] | None:
    token = admin_client_settings(None)[1] or admin_token()
    if not token:
        print(f"llm-gateway {prog}: set GATEWAY_ADMIN_KEY (or GATEWAY_ADMIN_TOKEN)", file=sys.stderr)
        return None
    return {"authorization": f"Bearer {token}"}


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("name", "org", *LIMITS, *BUDGETS):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "models", None):
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if getattr(args, "metadata", None):
        fields["metadata"] = json.loads(args.metadata)
    return fields


def _call(prog: str, args: argparse.Namespace, method: str, path: str, body: Any = None) -> httpx.Response | None:
    url, _ = admin_client_settings(args.url)
    headers = _headers(prog)
    if headers is None:
        return None
    try:
        r = request(method, url + path, body, headers, args.wait)
    except httpx.HTTPError as exc:
        print(f"llm-gateway {prog}: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        print(f"llm-gateway {prog}: {r.status_code}: {message}", file=sys.stderr)
        return None
    return r


def run(args: argparse.Namespace) -> int:
    item = f"{args.path}/{getattr(args, 'id', '')}"
    method, path, body = {
        "create": ("POST", args.path, _fields(args)),
        "list": ("GET", args.path, None),
        "get": ("GET", item, None),
        "update": ("PATCH", item, _fields(args)),
        "delete": ("DELETE", item, None),
        "usage": ("GET", item + "/usage", None),
        "keys": ("GET", item + "/keys", None),
    }[args.op]
    r = _call(args.noun, args, method, path, body)
    if r is None:
        return 1
    payload = r.json()
    if args.op == "list":
        for group in payload["data"]:
            print(f"{group['id']}\t{group['name']}\t{group.get('org') or ''}")
        return 0
    print(json.dumps(payload, indent=2))
    return 0


def spend(args: argparse.Namespace) -> int:
    params = {"group_by": args.group_by, "format": "csv" if args.format == "csv" else "json"}
    for name in ("since", "until", "team", "key", "org", "model"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    r = _call("spend", args, "GET", "/admin/spend?" + str(httpx.QueryParams(params)))
    if r is None:
        return 1
    if args.format == "csv":
        sys.stdout.write(r.text)
        return 0
    payload = r.json()
    if args.format == "json":
        print(json.dumps(payload, indent=2))
        return 0
    groups = payload["group_by"]
    print("\t".join([*groups, "requests", "prompt_tokens", "completion_tokens", f"spend ({payload['currency']})"]))
    for row in payload["data"]:
        cells = [str(row[g] if row[g] is not None else "-") for g in groups]
        cells += [str(row["requests"]), str(row["prompt_tokens"]), str(row["completion_tokens"]), f"{row['spend']:.6f}"]
        print("\t".join(cells))
    total = payload["total"]
    print(f"total\t{total['requests']} requests\t{total['spend']:.6f} {payload['currency']}")
    return 0
