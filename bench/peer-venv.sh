#!/usr/bin/env bash
# Creates (or keeps, when it already holds that version) a virtual environment of its own for one
# peer the benches compare the gateway with: a peer is not a dependency, and pins its own packages.
#   bench/peer-venv.sh VENV DISTRIBUTION VERSION [REQUIREMENT]   (REQUIREMENT defaults to DIST==VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$1 DIST=$2 VERSION=$3
REQUIREMENT=${4:-$DIST==$VERSION}
PYTHON=${PYTHON:-python3}
# pip warns once per package about this machine's empty local index; keep the log readable.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
installed() { "$VENV/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('$DIST') != '$VERSION')" 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && installed; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
pip_quiet "$VENV/bin/python" -m pip install -q "$REQUIREMENT"
"$VENV/bin/python" -c "from importlib.metadata import version; print('$DIST', version('$DIST'))"
