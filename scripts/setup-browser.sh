#!/usr/bin/env bash
# Installs Debian's chromium (and a font, so screenshots show text) for the console's browser tests
# (tests/test_console.py), which drive it through the Python playwright package. Idempotent.
# Never `playwright install`: that downloads a browser build from outside the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/progress.sh
if [ -x /usr/bin/chromium ] && [ -d /usr/share/fonts/truetype/dejavu ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium is missing at /usr/bin/chromium: install it (e.g. apt-get install chromium)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
echo "setup: installing chromium for the console's browser tests (apt-get; a minute or two)" >&2
with_progress "installing chromium" $SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive with_progress "installing chromium" \
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
