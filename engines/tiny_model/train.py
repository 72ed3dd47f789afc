"""Train the bundled tiny Llama model from text present on any Debian/Python machine.

The gateway needs a real Hugging Face causal LM for offline tests and demos, but
no weights can be downloaded, so this script builds one from scratch: a
byte-level BPE tokenizer plus a ~2.6M parameter ``LlamaForCausalLM`` trained for
a fixed number of CPU steps (about 9 minutes on 2 cores).

Usage::

    python engines/tiny_model/train.py [--out DIR] [--steps N | --minutes M]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import pydoc_data.topics
import random
import re
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SEED = 1234
VOCAB_SIZE = 4096
SEQ_LEN = 256
BATCH_SIZE = 16
# ~0.95 s/step on 2 idle cores, i.e. about 9 minutes of training (+1 min data prep).
DEFAULT_STEPS = 560
WARMUP_STEPS = 40
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
# Fraction of training tokens made of synthetic chat turns: enough for the model
# to reliably answer after <|assistant|> and stop with </s>, small enough that it
# still learns plain English.
CHAT_TOKEN_FRACTION = 0.3
VAL_EVERY_NTH_DOC = 20

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Order fixes the ids: <s>=0, </s>=1, <unk>=2, <pad>=3, <|system|>=4, ...
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD, *ROLE_TOKENS]

# Zephyr/TinyLlama-chat style: </s> closes every turn, so end-of-turn == EOS and
# any server stops generation on the model's own eos_token_id.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Packages in Debian's essential/required set, so these files exist on every
# Debian system (missing ones are skipped, keeping the script portable).
DEBIAN_DOC_PACKAGES = [
    "adduser", "apt", "base-files", "base-passwd", "bash", "bsdutils",
    "coreutils", "dash", "debconf", "debianutils", "diffutils", "dpkg",
    "e2fsprogs", "findutils", "gpgv", "grep", "gzip", "hostname",
    "init-system-helpers", "libc6", "libgcc-s1", "libgcrypt20", "libgnutls30",
    "libnettle8", "libpam0g", "libstdc++6", "login", "mawk", "ncurses-base",
    "passwd", "perl-base", "sed", "sysvinit-utils", "tar", "tzdata",
    "util-linux", "zlib1g",
]  # fmt: skip

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant that answers questions about software.",
    "Answer the user briefly.",
]


# --------------------------------------------------------------------------- data


def _normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\f", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _debian_copyright(text: str) -> str:
    # Undo the deb822 folding: continuation lines start with a space, " ." is a blank line.
    lines = []
    for line in text.split("\n"):
        if line.startswith(" "):
            line = "" if line.strip() == "." else line[1:]
        lines.append(line)
    return "\n".join(lines)


def _stdlib_docstrings() -> list[str]:
    # Docstrings are the largest body of English prose every Python install ships.
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo"}
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    # Interactive examples are code, not English; drop them.
                    lines = [ln for ln in doc.split("\n") if not ln.lstrip().startswith((">>>", "..."))]
                    docs.append("\n".join(lines))
    return docs


def gather_documents() -> list[tuple[str, str]]:
    """Return deterministic, de-duplicated ``(source, text)`` documents."""
    raw: list[tuple[str, str]] = []
    for key in sorted(pydoc_data.topics.topics):
        raw.append((f"pydoc:{key}", pydoc_data.topics.topics[key]))
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file() and not path.is_symlink():
            raw.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
    for pkg in DEBIAN_DOC_PACKAGES:
        path = Path("/usr/share/doc") / pkg / "copyright"
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            raw.append((str(path), _debian_copyright(text)))
    raw.extend(("stdlib-docstring", doc) for doc in _stdlib_docstrings())

    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    for source, text in raw:
        text = _normalize(text)
        digest = hashlib.sha1(text.encode()).hexdigest()
        if len(text) >= 40 and digest not in seen:
            seen.add(digest)
            docs.append((source, text))
    return docs


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_DEFINITION = re.compile(r"^(?:(The|A|An) )?([A-Za-z][\w\- ]{2,40}?) (is|are) (?:a|an|the) ")


def _sentences(paragraph: str) -> list[str]:
    flat = " ".join(paragraph.split())
    return [s for s in _SENTENCE_SPLIT.split(flat) if s]


def _is_prose(sentence: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return 20 <= len(sentence) <= 300 and letters / len(sentence) > 0.85


def build_chat_examples(docs: list[tuple[str, str]], rng: random.Random) -> list[list[dict[str, str]]]:
    """Turn prose paragraphs into single-turn conversations.

    The user turn is a sentence (or a question derived from a definition-like
    sentence, or a pydoc topic name) and the assistant turn is the text that
    follows it, so the model learns to continue on topic and then end the turn.
    """
    examples: list[list[dict[str, str]]] = []
    for source, text in docs:
        if source.startswith("pydoc:"):
            sents = [s for s in _sentences(text.split("\n\n", 1)[-1]) if _is_prose(s)][:3]
            topic = source.removeprefix("pydoc:").replace("-", " ").replace("_", " ")
            if sents:
                question = rng.choice([f"Tell me about {topic}.", f"What is {topic}?", f"Explain {topic}."])
                examples.append(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(sents)}]
                )
        for paragraph in text.split("\n\n"):
            sents = _sentences(paragraph)
            if len(sents) < 2 or not all(_is_prose(s) for s in sents[:4]):
                continue
            answer_len = rng.randint(1, 3)
            match = _DEFINITION.match(sents[0])
            if match and rng.random() < 0.7:
                # "A license is a ..." -> "What is a license?" answered by the paragraph itself.
                article = f"{match.group(1).lower()} " if match.group(1) else ""
                user, answer = f"What {match.group(3)} {article}{match.group(2)}?", sents[: answer_len + 1]
            else:
                user, answer = sents[0], sents[1 : 1 + answer_len]
            conv = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(answer)}]
            if rng.random() < 0.25:
                conv.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            examples.append(conv)
    return examples


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols keep any input encodable (no <unk> in practice).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # Plain prompts get BOS like the training documents; chat prompts carry it via the template.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------- model


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        # head_dim 64 is supported by every attention backend (vLLM's included).
        num_attention_heads=3,
        num_key_value_heads=3,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_chunks(token_docs: list[list[int]]) -> torch.Tensor:
    # Pack documents back to back; each chunk holds SEQ_LEN inputs plus one shifted target.
    stream = [t for doc in token_docs for t in doc]
    n = (len(stream) - 1) // SEQ_LEN
    return torch.tensor(stream[: n * SEQ_LEN + 1]).unfold(0, SEQ_LEN + 1, SEQ_LEN)


def batches(chunks: torch.Tensor, rng: random.Random) -> Iterator[torch.Tensor]:
    while True:  # epochs, each in a fresh seeded order
        order = list(range(len(chunks)))
        rng.shuffle(order)
        for i in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            yield chunks[order[i : i + BATCH_SIZE]]


def lm_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, chunks: torch.Tensor) -> float:
    model.eval()
    losses = [lm_loss(model, chunks[i : i + BATCH_SIZE]).item() for i in range(0, len(chunks), BATCH_SIZE)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, ids: list[int], n: int = 40) -> str:
    model.eval()
    # cast: transformers types generate()'s self as a protocol mypy cannot match.
    out = cast(Any, model).generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        pad_token_id=tok.pad_token_id,
    )
    model.train()
    return str(tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=False))


def make_portable(out: Path) -> None:
    """Rewrite the saved files so transformers 4.x (e.g. inside vLLM) reads them too.

    transformers 5 writes ``rope_parameters``, ``TokenizersBackend``, a list-valued
    ``extra_special_tokens`` and a separate ``chat_template.jinja``; older loaders
    expect ``rope_theta``/``torch_dtype``, ``PreTrainedTokenizerFast``,
    ``additional_special_tokens`` and the template inside tokenizer_config.json.
    """
    config = json.loads((out / "config.json").read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float16"))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.pop("extra_special_tokens", None)
    tok_config["additional_special_tokens"] = ROLE_TOKENS
    tok_config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    special_map: dict[str, str | list[str]] = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    special_map |= {"pad_token": PAD, "additional_special_tokens": ROLE_TOKENS}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the files ship as package data


# --------------------------------------------------------------------------- main


def main() -> None:
    default_out = Path(__file__).resolve().parent / "tiny-llama"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out, help="output directory (HF format)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (reproducible)")
    group.add_argument("--minutes", type=float, help="train for ~M minutes instead (step count timed at run time)")
    args = parser.parse_args()

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    t0 = time.time()

    docs = gather_documents()
    chats = build_chat_examples(docs, rng)
    corpus_mb = sum(len(t) for _, t in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {corpus_mb:.2f} MB; {len(chats)} chat examples")

    tok = train_tokenizer([t for _, t in docs])
    rendered = [str(tok.apply_chat_template(c, tokenize=False)) for c in chats]
    # Encode with the backend directly: batched, and no "longer than model_max_length"
    # warnings for whole documents that are chunked later anyway.
    backend = tok.backend_tokenizer
    plain_ids = [
        [tok.bos_token_id, *e.ids, tok.eos_token_id]
        for e in backend.encode_batch([t for _, t in docs], add_special_tokens=False)
    ]
    # The rendered template already starts with <s> and ends each turn with </s>.
    chat_ids = [e.ids for e in backend.encode_batch(rendered, add_special_tokens=False)]

    # Hold out every Nth document of each kind so validation covers both prose and chat.
    val_docs = plain_ids[::VAL_EVERY_NTH_DOC] + chat_ids[::VAL_EVERY_NTH_DOC]
    train_plain = [d for i, d in enumerate(plain_ids) if i % VAL_EVERY_NTH_DOC]
    train_chat = [d for i, d in enumerate(chat_ids) if i % VAL_EVERY_NTH_DOC]
    rng.shuffle(train_chat)
    plain_tokens = sum(map(len, train_plain))
    budget = int(plain_tokens * CHAT_TOKEN_FRACTION / (1 - CHAT_TOKEN_FRACTION))
    kept, used = [], 0
    for d in train_chat:
        if used >= budget:
            break
        kept.append(d)
        used += len(d)
    train_docs = train_plain + kept
    rng.shuffle(train_docs)
    train_chunks, val_chunks = to_chunks(train_docs), to_chunks(val_docs)
    print(
        f"tokens: train {train_chunks.numel() / 1e6:.2f}M ({used / 1e6:.2f}M chat),"
        f" val {val_chunks.numel() / 1e6:.2f}M; {len(train_chunks)} train chunks of {SEQ_LEN}"
    )

    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )

    total = args.steps
    data = batches(train_chunks, rng)
    model.train()
    train_t0 = time.time()
    ema = None
    step = 0
    while step < total:
        for group_ in opt.param_groups:
            group_["lr"] = lr_at(step, total)
        loss = lm_loss(model, next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        if args.minutes is not None and step == 10:
            # Calibrate after the first steps (still in warmup, so the schedule is unaffected).
            per_step = (time.time() - train_t0) / step
            total = max(WARMUP_STEPS + 1, int(args.minutes * 60 / per_step))
            print(f"--minutes {args.minutes}: {per_step:.2f}s/step -> {total} steps")
        if step % 50 == 0 or step == total:
            msg = f"step {step}/{total} lr {lr_at(step - 1, total):.2e} train {ema:.3f}"
            if step % 200 == 0 or step == total:
                msg += f" val {evaluate(model, val_chunks):.3f}"
            print(f"{msg} ({time.time() - train_t0:.0f}s)", flush=True)
    train_secs = time.time() - train_t0

    final_train = evaluate(model, train_chunks[:: max(1, len(train_chunks) // len(val_chunks))])
    final_val = evaluate(model, val_chunks)
    print(f"final: train {final_train:.3f} val {final_val:.3f}; training {train_secs / 60:.1f} min")
    print("sample:", repr(sample(model, tok, tok.encode("The license"))))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is a license?"}], add_generation_prompt=True, tokenize=False
    )
    print("chat sample:", repr(sample(model, tok, tok.encode(str(prompt), add_special_tokens=False))))

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    # fp16 halves the checkpoint; the weights are small enough to be exact-ish in fp16.
    model.half().save_pretrained(args.out)
    tok.save_pretrained(args.out)
    make_portable(args.out)
    print(f"saved to {args.out} (total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
