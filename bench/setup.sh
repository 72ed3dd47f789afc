#!/usr/bin/env bash
# What the benchmarks need beyond the project's .venv (scripts/setup.sh makes that, with py-spy in the dev
# extra): Debian's nginx with its echo module (the cheap canned upstream of bench/request_path.py) and
# LiteLLM's proxy in .venv-litellm (bench/setup-litellm.sh). Idempotent; apt-get needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null 2>&1 || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
  # nginx-light is the smallest build; the benchmark starts its own nginx with its own config, never the
  # system service (Debian's postinst may start one on port 80 where services are allowed to start).
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-http-echo) >/dev/null
fi
if ! command -v redis-server >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
fi
bench/setup-litellm.sh
