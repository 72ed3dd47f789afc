#!/usr/bin/env bash
# Creates .venv-sglang: SGLang's router (Rust, `sglang-router` from PyPI), the compiled peer the
# request-path bench compares the gateway with (bench/request_path.py). Idempotent.
set -euo pipefail
VERSION=${SGLANG_ROUTER_VERSION:-0.3.2}
exec "$(dirname "$0")/peer-venv.sh" "${SGLANG_VENV:-.venv-sglang}" sglang-router "$VERSION"
