#!/usr/bin/env bash
# Creates .venv-litellm: LiteLLM's proxy, the reference the request-path bench compares the gateway
# with (bench/request_path.py). Kept out of the project's .venv: it pins its own aiohttp, starlette
# and friends. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip warns once per package about this machine's empty local index; keep the log readable.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
VENV=${LITELLM_VENV:-.venv-litellm}
VERSION=${LITELLM_VERSION:-1.108.7}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/litellm" ] && "$VENV/bin/python" -c "import litellm, sys; from importlib.metadata import version; sys.exit(version('litellm') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
pip_quiet "$VENV/bin/python" -m pip install -q "litellm[proxy]==$VERSION"
"$VENV/bin/python" -c "from importlib.metadata import version; print('litellm', version('litellm'))"
