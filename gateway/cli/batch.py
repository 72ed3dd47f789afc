"""`llm-gateway batch run|status|cancel|download`: the Batch API from the command line.

    llm-gateway batch run requests.jsonl --endpoint /v1/chat/completions --wait [--url U] [--key K]

`run` uploads the file (streamed), creates the batch and prints its id; with `--wait` it shows a
progress bar (plain text: redrawn in place on a terminal, one line per change otherwise) until
the batch ends, then writes the results next to the input: `requests.output.jsonl` and
`requests.errors.jsonl`. The key comes from `--key` or GATEWAY_API_KEY, the gateway from `--url`
or GATEWAY_URL (default http://127.0.0.1:8080).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.core.request import ENDPOINTS
from gateway.settings.batch import batch_client_settings

FINAL = ("completed", "failed", "expired", "cancelled")
BAR_WIDTH = 30


class CliError(Exception):
    pass


def add_batch_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the gateway (default: $GATEWAY_URL or http://127.0.0.1:8080)")
    common.add_argument("--key", help="the API key (default: $GATEWAY_API_KEY)")
    batch = sub.add_parser("batch", help="run batches through the gateway's Batch API")
    ops = batch.add_subparsers(dest="op", required=True)
    run = ops.add_parser("run", parents=[common], help="upload a JSONL file and create a batch from it")
    run.add_argument("file", type=Path)
    run.add_argument("--endpoint", default="/v1/chat/completions", choices=list(ENDPOINTS))
    run.add_argument("--completion-window", default="24h")
    run.add_argument("--wait", action="store_true", help="show progress until it ends, then download the results")
    run.add_argument("--poll", type=float, default=2.0, help="seconds between progress checks")
    for name, text in (("status", "show a batch"), ("cancel", "cancel a batch")):
        ops.add_parser(name, parents=[common], help=text).add_argument("id")
    download = ops.add_parser("download", parents=[common], help="download a batch's output and error files")
    download.add_argument("id")
    download.add_argument("--to", type=Path, default=Path("."), help="directory (default: here)")
    batch.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    url, key = batch_client_settings(args.url, args.key)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60, read=600)) as client:
            if args.op == "run":
                return run(client, args, sys.stdout)
            if args.op == "download":
                batch = call(client, "GET", f"/v1/batches/{args.id}")
                return 0 if download(client, batch, args.to / args.id, sys.stdout) else 1
            path = f"/v1/batches/{args.id}" + ("/cancel" if args.op == "cancel" else "")
            print(json.dumps(call(client, "POST" if args.op == "cancel" else "GET", path), indent=2))
            return 0
    except CliError as exc:
        print(f"llm-gateway batch: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"llm-gateway batch: cannot reach {url}: {exc}", file=sys.stderr)
        return 1


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    r = client.request(method, path, **kwargs)
    try:
        payload: dict[str, Any] = r.json()
    except ValueError:
        raise CliError(f"{method} {path}: {r.status_code} {r.text[:200]}") from None
    if r.status_code >= 400:
        message = f"{method} {path}: {r.status_code}: {payload.get('error', {}).get('message', r.text)}"
        if r.status_code == 401 and "authorization" not in client.headers:
            message += " (this gateway wants an API key: pass --key or set GATEWAY_API_KEY)"
        raise CliError(message)
    return payload


def run(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    with path.open("rb") as f:
        uploaded = call(client, "POST", "/v1/files", data={"purpose": "batch"}, files={"file": (path.name, f)})
    body = {"input_file_id": uploaded["id"], "endpoint": args.endpoint, "completion_window": args.completion_window}
    batch = call(client, "POST", "/v1/batches", json=body)
    print(f"batch {batch['id']} ({batch['request_counts']['total']} lines, file {uploaded['id']})", file=out)
    if batch["status"] == "failed":
        for error in (batch.get("errors") or {}).get("data", []):
            where = f"line {error['line']}: " if error.get("line") else ""
            print(f"  {where}{error['message']} ({error['code']})", file=out)
        return 1
    if not args.wait:
        return 0
    batch = follow(client, batch, args.poll, out)
    return 0 if download(client, batch, path.with_suffix(""), out) and batch["status"] == "completed" else 1


def follow(client: httpx.Client, batch: dict[str, Any], poll: float, out: TextIO) -> dict[str, Any]:
    """Redraws the progress bar until the batch ends."""
    started, shown = time.monotonic(), ""
    redraw = out.isatty()
    while True:
        line = progress(batch, time.monotonic() - started)
        if line != shown:
            out.write(("\r" + line) if redraw else (line + "\n"))
            out.flush()
            shown = line
        if batch["status"] in FINAL:
            if redraw:
                out.write("\n")
            return batch
        time.sleep(poll)
        batch = call(client, "GET", f"/v1/batches/{batch['id']}")


def progress(batch: dict[str, Any], elapsed: float) -> str:
    counts = batch["request_counts"]
    total, done = counts["total"], counts["completed"] + counts["failed"]
    filled = BAR_WIDTH * done // total if total else 0
    rate = done / elapsed if elapsed > 0 else 0.0
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} lines, {counts['failed']} failed,"
        f" {rate:.1f} lines/s, {batch['status']}"
    )


def download(client: httpx.Client, batch: dict[str, Any], stem: Path, out: TextIO) -> bool:
    """Writes `<stem>.output.jsonl` and `<stem>.errors.jsonl` (those that exist); True if any."""
    wrote = False
    for field, suffix in (("output_file_id", ".output.jsonl"), ("error_file_id", ".errors.jsonl")):
        file_id = batch.get(field)
        if not file_id:
            continue
        target = stem.parent / (stem.name + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        with client.stream("GET", f"/v1/files/{file_id}/content") as r:
            if r.status_code != 200:
                raise CliError(f"downloading {file_id}: {r.status_code}")
            with target.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        print(f"{field.removesuffix('_file_id')}: {target}", file=out)
        wrote = True
    return wrote
