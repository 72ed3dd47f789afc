#!/usr/bin/env bash
# Where the gateway's time goes: py-spy records the gateway (with keys and quotas, and without) and the floor
# proxy, each pinned to one core, under the non-stream closed loop (16 clients) and under paced streams, then
# prints the top functions by self and total samples and each package's share. The raw stacks land in
# bench/results/profile-<time>/ (open them in speedscope). Extra arguments go to bench/request_path.py, e.g.
#   bench/profile_gateway.sh --profile-s 20 --profile-targets gateway+quota --paced-streams 500
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/py-spy ]; then
  .venv/bin/python -m pip install -q "py-spy>=0.4"
fi
exec .venv/bin/python bench/request_path.py --sections profile "$@"
