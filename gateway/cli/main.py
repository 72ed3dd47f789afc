"""`llm-gateway serve --config FILE [--host H] [--port P] [--workers N]`, `llm-gateway keys ...`,
`llm-gateway report MODEL ...`, `llm-gateway batch ...`, `llm-gateway teams|orgs ...`, `llm-gateway spend`."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.adapters import add_adapter_commands
from gateway.cli.batch import add_batch_commands
from gateway.cli.keys import add_keys_commands
from gateway.cli.report import add_report_command
from gateway.cli.teams import add_team_commands
from gateway.process.worker import configure_logging
from gateway.settings import ConfigError
from gateway.settings.source import ConfigSource


def serve(args: argparse.Namespace) -> int:
    from gateway.process.main import serve as run

    source = ConfigSource(args.config, args.host, args.port, args.workers)
    try:
        loaded = source.load()
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2
    return run(source, loaded, args.log_level)


def check(args: argparse.Namespace) -> int:
    try:
        settings = ConfigSource(args.config).load().settings  # as `serve` reads it (the TLS pair too)
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
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
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=serve)
    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("--config", required=True)
    c.set_defaults(func=check)
    add_keys_commands(sub)
    add_adapter_commands(sub)
    add_report_command(sub)
    add_batch_commands(sub)
    add_team_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
