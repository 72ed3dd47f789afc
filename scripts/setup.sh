#!/usr/bin/env bash
# Creates .venv and installs the project with every extra. Idempotent; safe to re-run.
# torch is pinned to the CPU build (see pyproject.toml), so no CUDA wheels are pulled.
# Takes about a minute or two the first time (.venv is about 1.9 GB), seconds after that.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { echo "setup: $*" >&2; }
# pip warns once per package about this machine's empty local index; keep the log readable.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
step "upgrading pip"
pip_quiet .venv/bin/python -m pip install -q --upgrade pip
step "installing the project and its dependencies (torch CPU, transformers; a minute or two the first time)"
# PYTHONWARNINGS: setuptools prints a boxed warning about editable installs that is not ours to fix.
PYTHONWARNINGS=ignore pip_quiet .venv/bin/python -m pip install -q -e '.[all]'
# Tests run a private redis-server and a private Redis Cluster (made by redis-cli, which Debian
# ships in redis-tools, with redis-benchmark); install them where the machine lacks them.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    step "installing redis-server and redis-tools (apt-get)"
    (apt-get update -qq && apt-get install -y -qq redis-server redis-tools) >/dev/null
  else
    echo "redis-server and redis-cli are missing: install them (e.g. apt-get install redis-server redis-tools)" >&2
    exit 1
  fi
fi
# tests/test_deploy.py renders the Kustomize overlays with `kubectl kustomize` (kubectl 1.27 or later:
# kustomize v5); Debian's kubernetes-client is too old, so it is not installed from here.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl is missing: tests/test_deploy.py needs it (and fails without it under CI=true)" >&2
fi
size=$(du -sh .venv 2>/dev/null | cut -f1)
echo "set-up done in $(($(date +%s) - started))s (.venv: ${size}). Start the gateway: .venv/bin/llm-gateway serve --config configs/default.yaml"
