"""`llm-gateway adapters add|list|get|remove` and `llm-gateway cache show|invalidate`: the LoRA
adapter and response cache admin API from the command line (GATEWAY_ADMIN_KEY, --url)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from gateway.cli.keys import connection_options, request
from gateway.settings import admin_client_settings


def add_adapter_commands(sub: Any) -> None:
    adapters = sub.add_parser("adapters", help="manage LoRA adapters served as models")
    connection_options(adapters, default=True)
    ops = adapters.add_subparsers(dest="op", required=True, metavar="COMMAND")
    add = ops.add_parser("add", help="serve an adapter on every replica")
    add.add_argument("name", help="the public model name clients will ask for")
    add.add_argument("--base", required=True, help="the public model whose engines serve it")
    add.add_argument(
        "--path", required=True, help="the weights: a path in adapters.directories or a URI in adapters.uris"
    )
    listing = ops.add_parser("list", help="list adapters and where they are loaded")
    get = ops.add_parser("get", help="show one adapter")
    get.add_argument("name")
    remove = ops.add_parser("remove", help="stop serving an adapter added with `add`")
    remove.add_argument("name")
    for p in (add, listing, get, remove):
        connection_options(p, default=False)
    adapters.set_defaults(func=run_adapters)

    cache = sub.add_parser("cache", help="the response cache: its figures, or invalidate it")
    connection_options(cache, default=True)
    cops = cache.add_subparsers(dest="op", required=True, metavar="COMMAND")
    show = cops.add_parser("show", help="entries, bytes and the memory bound")
    inval = cops.add_parser("invalidate", help="drop the cached answers of one model (--model) or all")
    inval.add_argument("--model", help="one public model (default: every model)")
    for p in (show, inval):
        connection_options(p, default=False)
    cache.set_defaults(func=run_cache)


def run_adapters(args: argparse.Namespace) -> int:
    calls = {
        "add": (
            "POST",
            "/admin/adapters",
            {
                "name": getattr(args, "name", None),
                "base": getattr(args, "base", None),
                "path": getattr(args, "path", None),
            },
        ),
        "list": ("GET", "/admin/adapters", None),
        "get": ("GET", f"/admin/adapters/{getattr(args, 'name', '')}", None),
        "remove": ("DELETE", f"/admin/adapters/{getattr(args, 'name', '')}", None),
    }
    method, path, body = calls[args.op]
    return _call("adapters", args, method, path, body)


def run_cache(args: argparse.Namespace) -> int:
    if args.op == "show":
        return _call("cache", args, "GET", "/admin/cache", None)
    return _call("cache", args, "POST", "/admin/cache", {"model": args.model} if args.model else {})


def _call(command: str, args: argparse.Namespace, method: str, path: str, body: Any) -> int:
    url, admin_key = admin_client_settings(args.url)
    if not admin_key:
        print(f"llm-gateway {command}: set GATEWAY_ADMIN_KEY to the gateway's admin key", file=sys.stderr)
        return 2
    try:
        r = request(method, url + path, body, {"authorization": f"Bearer {admin_key}"}, args.wait)
    except httpx.HTTPError as exc:
        print(f"llm-gateway {command}: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        payload = r.json()
    except ValueError:
        payload = {"raw": r.text}
    if r.status_code >= 400:
        message = payload.get("error", {}).get("message", r.text) if isinstance(payload, dict) else r.text
        print(f"llm-gateway {command}: {r.status_code}: {message}", file=sys.stderr)
        return 1
    if command == "adapters" and args.op == "list":
        for a in payload["data"]:
            print(f"{a['id']}\t{a['base']}\t{a['source']}\t{','.join(a['loaded_on']) or '-'}\t{a['path']}")
        return 0
    print(json.dumps(payload, indent=2))
    return 0
