#!/usr/bin/env bash
# Creates .venv-sglang: SGLang's router (Rust, `sglang-router` from PyPI), the compiled peer the
# request-path bench compares the gateway with (bench/request_path.py). Kept out of the project's
# .venv: it is a bench peer, not a dependency. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
VENV=${SGLANG_VENV:-.venv-sglang}
VERSION=${SGLANG_ROUTER_VERSION:-0.3.2}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('sglang-router') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
pip_quiet "$VENV/bin/python" -m pip install -q "sglang-router==$VERSION"
"$VENV/bin/python" -c "from importlib.metadata import version; print('sglang-router', version('sglang-router'))"
