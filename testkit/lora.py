"""LoRA adapters for tests, made from the tiny model's bundled one: no download, no training."""

from __future__ import annotations

import shutil
from pathlib import Path

from testkit.procs import ROOT

BUNDLED_ADAPTER = ROOT / "engines" / "tiny_model" / "adapters" / "python-code"


def scaled_adapter(out: Path, scale: float, source: Path = BUNDLED_ADAPTER) -> Path:
    """A copy of `source` whose update (B @ A) is `scale` times the original: B scaled, A kept.
    Scales 1, -1 and 2 give greedy answers that differ from each other and from the base model's."""
    from safetensors.torch import load_file, save_file  # torch: only where an engine runs anyway

    shutil.copytree(source, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    scaled = {k: (v * scale).to(v.dtype) if "lora_B" in k else v for k, v in weights.items()}
    save_file(scaled, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
