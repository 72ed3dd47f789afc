"""`llm-gateway serve --config FILE [--host H] [--port P] [--workers N]`, `llm-gateway keys ...` and
`llm-gateway report MODEL ...`, `llm-gateway batch ...`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

from gateway.batch.cli import add_batch_commands
from gateway.keys_cli import add_keys_commands
from gateway.report_cli import add_report_command
from gateway.settings import CONFIG_ENV, WORKERS_ENV, ConfigError, Settings, load_settings

log = logging.getLogger("gateway")


def _settings(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.supervisor import Supervisor

    settings = _settings(args.config)
    if settings is None:
        return 2
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    workers = args.workers or settings.server.workers
    os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    os.environ[WORKERS_ENV] = str(workers)
    metrics_dir = None
    if workers > 1:
        # Each worker writes its metric values here; any worker's /metrics sums them all.
        metrics_dir = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = Supervisor(settings.engines)
    supervisor.start()
    log.info("gateway on http://%s:%d with %d worker(s)", host, port, workers)
    try:
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
            backlog=4096,
        )
    finally:
        supervisor.stop()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def check(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return 2
    print(f"{args.config}: ok ({len(settings.engines)} engines, {len(settings.models)} models)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible LLM serving gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway (and its managed engines)")
    s.add_argument("--config", required=True)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=serve)
    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("--config", required=True)
    c.set_defaults(func=check)
    add_keys_commands(sub)
    add_report_command(sub)
    add_batch_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
