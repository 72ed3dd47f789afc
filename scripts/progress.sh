# Sourced by the set-up scripts: progress lines while a long, quiet step runs (pip and apt-get
# print nothing for minutes with -q), and pip's log without this machine's local-index noise.

# pip warns once per package about an empty local index; keep the log readable.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# with_progress LABEL CMD...: runs CMD; every 15 s meanwhile prints "setup: LABEL: still going (Ns)".
with_progress() {
  local label=$1 started
  shift
  started=$(date +%s)
  # sleep gets no inherited stderr: killed mid-sleep, it must not hold a caller's pipe open.
  (while sleep "${PROGRESS_EVERY:-15}" </dev/null >/dev/null 2>&1; do
    echo "setup: $label: still going ($(($(date +%s) - started))s)" >&2
  done) &
  local ticker=$! rc=0
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}
