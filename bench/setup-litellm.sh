#!/usr/bin/env bash
# Creates .venv-litellm: LiteLLM's proxy, the reference the request-path bench compares the gateway
# with (bench/request_path.py); it pins its own aiohttp, starlette and friends. Idempotent.
set -euo pipefail
VERSION=${LITELLM_VERSION:-1.108.7}
exec "$(dirname "$0")/peer-venv.sh" "${LITELLM_VENV:-.venv-litellm}" litellm "$VERSION" "litellm[proxy]==$VERSION"
