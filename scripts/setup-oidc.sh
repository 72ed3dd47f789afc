#!/usr/bin/env bash
# Installs the OpenID Connect provider the sign-in tests start (tests/test_signin.py): panva's
# oidc-provider from npm, at the version pinned in tests/oidc/package-lock.json, into
# tests/oidc/node_modules. Needs Node.js 20+ and npm. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../tests/oidc"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "node and npm are needed for the sign-in tests (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
if [ -d node_modules/oidc-provider ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
