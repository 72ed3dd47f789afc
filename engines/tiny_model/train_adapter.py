"""Train the bundled LoRA adapter of the tiny model: it turns its prose into Python code.

The base model (train.py) learnt English from documentation; this adapter is fine-tuned on the
Python standard library's own source files, found on any machine with Python, so that its
greedy answers differ clearly from the base model's (they read like code). A real PEFT LoRA
training run of 60 steps (about a minute on 2 idle CPU cores; 16 minutes on a machine loaded
far past its cores); the adapter is ~240 KB (float16).

Usage::

    python engines/tiny_model/train_adapter.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
BASE = HERE / "tiny-llama"
SEED = 4321
SEQ_LEN = 128
BATCH_SIZE = 8
DEFAULT_STEPS = 60  # ~0.5 s/step on 2 idle cores
PEAK_LR = 4e-3
WARMUP_STEPS = 5
CORPUS_CHARS = 1_500_000
RANK = 8
# Every linear layer of the attention and the MLP: a strong, still tiny adapter.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBES = ["The license", "Once upon a time", "def "]


def python_sources() -> list[str]:
    """Source files of the standard library, in a fixed order, up to CORPUS_CHARS in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= CORPUS_CHARS:
            break
    return texts


def chunks_of(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    stream: list[int] = []
    for text in texts:
        stream += [*tokenizer.encode(text, add_special_tokens=True), tokenizer.eos_token_id]
    n = (len(stream) - 1) // SEQ_LEN
    return torch.tensor(stream[: n * SEQ_LEN + 1]).unfold(0, SEQ_LEN + 1, SEQ_LEN)


def lr_at(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def loss_of(model: Any, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "adapters" / "python-code")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    before = {p: greedy(base, tokenizer, p) for p in PROBES}

    chunks = chunks_of(tokenizer, python_sources())
    held_out = chunks[: BATCH_SIZE * 2]
    train = chunks[BATCH_SIZE * 2 :]
    print(f"corpus: {len(chunks)} chunks of {SEQ_LEN} tokens")

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    with torch.no_grad():
        print(f"held-out loss before: {loss_of(model, held_out).item():.3f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=PEAK_LR, weight_decay=0.0)
    model.train()
    order: list[int] = []
    started = time.monotonic()
    for step in range(args.steps):
        if len(order) < BATCH_SIZE:
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = train[[order.pop() for _ in range(BATCH_SIZE)]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps)
        loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.monotonic() - started:.0f}s")
    model.eval()
    with torch.no_grad():
        print(f"held-out loss after: {loss_of(model, held_out).item():.3f}")

    model.half()  # float16 halves the files; loading casts back to the base model's dtype
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    adapter_config = json.loads((args.out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "tiny-llama"  # not this machine's path
    (args.out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (args.out / "README.md").unlink(missing_ok=True)  # peft's model-card template
    for path in args.out.iterdir():
        path.chmod(0o644)
    model.float()
    for probe in PROBES:
        print(f"{probe!r}\n  base:    {before[probe]!r}\n  adapter: {greedy(model, tokenizer, probe)!r}")


if __name__ == "__main__":
    main()
