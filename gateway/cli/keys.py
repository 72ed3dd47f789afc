"""`llm-gateway keys create|list|get|update|revoke|usage`: the admin API from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from gateway.settings import admin_client_settings

LIMITS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "max_concurrent": "requests in flight at once",
    "daily_tokens": "tokens per UTC day",
    "monthly_tokens": "tokens per UTC month",
}


def add_keys_commands(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="manage API keys through the admin API",
        description="Manage API keys through the gateway's admin API (needs Redis and GATEWAY_ADMIN_KEY "
        "in this command's environment, the same as the gateway's).",
    )
    connection_options(keys, default=True)
    ops = keys.add_subparsers(dest="op", required=True, metavar="COMMAND")

    def limits(p: argparse.ArgumentParser) -> None:
        for name, what in LIMITS.items():
            p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name, metavar="N", help=f"limit: {what}")
        p.add_argument("--models", help="comma-separated public model names (default: all)")
        p.add_argument("--expires-at", help="ISO 8601 or unix seconds")
        p.add_argument("--metadata", help="a JSON object")
        p.add_argument("--priority", choices=("high", "normal", "low"), help="band when engines are full")
        p.add_argument("--weight", type=float, help="share within the band (default 1)")
        p.add_argument("--team", help="the team's id ('none': no team)")
        for name in ("daily_budget", "monthly_budget"):
            p.add_argument(f"--{name.replace('_', '-')}", type=float, dest=name, help="money, in the pricing currency")

    create = ops.add_parser("create", help="create a key; prints the secret once")
    create.add_argument("--name", required=True, help="a name for people (need not be unique)")
    limits(create)
    listing = ops.add_parser("list", help="list every key (never the secrets)")
    parsers = [create, listing]
    for op, what in (
        ("get", "show one key's record"),
        ("revoke", "revoke a key at once on every replica (its record stays for audit)"),
        ("usage", "show a key's usage: today, this month and the current minute"),
    ):
        parsers.append(ops.add_parser(op, help=what))
        parsers[-1].add_argument("id", help="the key's id (key_...), not its secret")
    update = ops.add_parser("update", help="change a key's name, limits, models, priority or weight")
    update.add_argument("id", help="the key's id (key_...), not its secret")
    update.add_argument("--name", help="a new name")
    limits(update)
    for p in [*parsers, update]:
        connection_options(p, default=False)  # `keys create --wait 60` as well as `keys --wait 60 create`
    keys.set_defaults(func=run)


def connection_options(p: argparse.ArgumentParser, default: bool) -> None:
    # On the subcommands the default is SUPPRESS, so that they do not undo a value given before.
    p.add_argument(
        "--url",
        default=None if default else argparse.SUPPRESS,
        help="the gateway's admin listener (default: $GATEWAY_URL or http://127.0.0.1:8080)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=30.0 if default else argparse.SUPPRESS,
        metavar="SECONDS",
        help="retry this long while the gateway is not up yet (default 30; 0: fail at once)",
    )


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(args, "name", None):
        fields["name"] = args.name
    for name in LIMITS:
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if args.models:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.expires_at:
        fields["expires_at"] = int(args.expires_at) if args.expires_at.isdigit() else args.expires_at
    if args.metadata:
        fields["metadata"] = json.loads(args.metadata)
    for name in ("priority", "weight", "daily_budget", "monthly_budget"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "team", None):
        fields["team"] = None if args.team == "none" else args.team
    return fields


def request(method: str, url: str, body: Any, headers: dict[str, str], wait: float) -> httpx.Response:
    """One admin call; while nothing listens yet (a gateway still starting), retried for `wait` seconds."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            return httpx.request(method, url, json=body, headers=headers, timeout=10)
        except httpx.ConnectError:
            if time.monotonic() >= deadline:
                raise
            if not said:
                said = True
                print(f"llm-gateway keys: waiting up to {wait:g}s for the gateway...", file=sys.stderr)
            time.sleep(0.25)


def run(args: argparse.Namespace) -> int:
    url, admin_key = admin_client_settings(args.url)
    if not admin_key:
        print("llm-gateway keys: set GATEWAY_ADMIN_KEY to the gateway's admin key", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {admin_key}"}
    requests = {
        "create": ("POST", "/admin/keys"),
        "list": ("GET", "/admin/keys"),
        "get": ("GET", "/admin/keys/{id}"),
        "update": ("PATCH", "/admin/keys/{id}"),
        "revoke": ("DELETE", "/admin/keys/{id}"),
        "usage": ("GET", "/admin/keys/{id}/usage"),
    }
    method, path = requests[args.op]
    body = _fields(args) if args.op in ("create", "update") else None
    try:
        r = request(method, url + path.format(id=getattr(args, "id", "")), body, headers, args.wait)
    except httpx.HTTPError as exc:
        waited = f" (waited {args.wait:g}s)" if args.wait else ""
        print(
            f"llm-gateway keys: cannot reach the gateway at {url}{waited}: {exc}. Is it running "
            "(llm-gateway serve --config FILE), and is this its admin address (--url or GATEWAY_URL)?",
            file=sys.stderr,
        )
        return 1
    is_json = r.headers.get("content-type", "").startswith("application/json")
    payload: dict[str, Any] = r.json() if is_json else {"raw": r.text}
    if r.status_code >= 400:
        print(f"llm-gateway keys: {r.status_code}: {payload.get('error', {}).get('message', r.text)}", file=sys.stderr)
        return 1
    if args.op == "list":
        for key in payload["data"]:
            state = "revoked" if key.get("revoked") else "active"
            print(f"{key['id']}\t{key['name']}\t{state}\t{key.get('prefix', '')}…")
        return 0
    print(json.dumps(payload, indent=2))
    if args.op == "create":
        print("The secret above is shown once; store it now.", file=sys.stderr)
    return 0
