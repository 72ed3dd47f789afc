#!/usr/bin/env bash
# Creates .venv and installs the project with every extra. Idempotent; safe to re-run.
# torch is pinned to the CPU build (see pyproject.toml), so no CUDA wheels are pulled.
# Takes 2-4 minutes the first time on an idle machine (.venv is about 2.1 GB), under half a minute after that; it prints a line
# every 15 s while pip works. SETUP_NO_HINT=1 leaves out the closing "start the gateway" hint
# (scripts/test.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/progress.sh
started=$(date +%s)
step() { echo "setup: $*" >&2; }
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
step "upgrading pip"
with_progress "upgrading pip" pip_quiet .venv/bin/python -m pip install -q --upgrade pip
step "installing the project and its dependencies (torch CPU, transformers; 2-4 minutes the first time)"
# PYTHONWARNINGS: setuptools prints a boxed warning about editable installs that is not ours to fix.
PYTHONWARNINGS=ignore with_progress "installing the project" pip_quiet .venv/bin/python -m pip install -q -e '.[all]'
# Tests run a private redis-server and a private Redis Cluster (made by redis-cli, which Debian
# ships in redis-tools, with redis-benchmark); install them where the machine lacks them.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    step "installing redis-server and redis-tools (apt-get)"
    with_progress "installing redis-server" sh -c 'apt-get update -qq && apt-get install -y -qq redis-server redis-tools' >/dev/null
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
if [ -n "${SETUP_NO_HINT:-}" ]; then
  echo "set-up done in $(($(date +%s) - started))s (.venv: ${size})" >&2
else
  echo "set-up done in $(($(date +%s) - started))s (.venv: ${size}). Start the gateway: .venv/bin/llm-gateway serve --config configs/default.yaml"
fi
