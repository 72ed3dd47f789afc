"""Prompts to token ids without ever holding up the event loop, however large the prompt.

Small prompts (the usual case) are tokenized on one worker thread: the event loop runs
meanwhile, and the hop costs microseconds. A prompt of megabytes takes seconds to tokenize,
and part of that work (building and freeing a million-token encoding) holds the GIL for up to
half a second at a time, which would stall /health and every stream on the event loop. Such
prompts go to a child process with its own tokenizer (`python -m engines.tokenizing MODEL`,
started at the first one, over JSON lines on its pipes), which sends back the ids only when
they can fit the model's context, else just their count: a huge prompt never costs the worker
more than copying its text out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engines.errors import EngineError, invalid

# Characters of prompt text from which tokenizing goes to the child process. Far below a size
# that tokenizes slowly (~1 s per 500 KB here), far above any everyday prompt.
LARGE_PROMPT_CHARS = 256 * 1024
# The child's memory grows with the largest prompt it has seen (hundreds of MB for a few MB of
# text) and is not given back: it exits once no huge prompt came for this long.
CHILD_IDLE_SECONDS = 60.0
_PIPE_LIMIT = 64 * 1024 * 1024  # the longest answer line: the ids of a prompt that fits the context

log = logging.getLogger(__name__)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]:
    """`continue_final`: the last message is an assistant's partial answer, which goes on (vLLM's
    `continue_final_message`; the gateway resumes a stream whose engine failed this way)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=not continue_final, continue_final_message=continue_final, tokenize=False
        )
    except Exception as exc:  # the template's own raise_exception(), e.g. a role it does not know
        raise invalid(f"The model's chat template rejected the messages: {exc}", param="messages") from None
    return _encode(tokenizer, text, False, "messages")


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return _encode(tokenizer, text, True, "prompt")


def _encode(tokenizer: Any, text: str, special: bool, param: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except (TypeError, UnicodeError):  # a lone surrogate (JSON's "\ud800") is no text to a tokenizer
        raise invalid("The text is not valid Unicode (it holds a lone surrogate).", param=param) from None


def _child_main(path: str) -> None:
    """The child process. Each request on stdin is a JSON header line {"chat", "limit", "bytes"}
    followed by that many bytes: the text as UTF-8, or the chat messages as JSON (raw text spares
    the worker's event loop a multi-MB json.dumps). Each answer is one JSON line on stdout."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "longer than the maximum length" is the point here
    tokenizer = AutoTokenizer.from_pretrained(path)
    out, source = sys.stdout, sys.stdin.buffer
    for line in source:
        request = json.loads(line)
        payload = source.read(request["bytes"]).decode("utf-8", "surrogatepass")
        try:
            if request["chat"]:
                ids = chat_ids(tokenizer, json.loads(payload), bool(request.get("continue_final")))
            else:
                ids = text_ids(tokenizer, payload)
        except Exception as exc:  # an EngineError does not cross the process boundary as itself
            answer: dict[str, Any] = {"rejected": getattr(exc, "message", str(exc))}
        else:
            answer = {"ids": ids} if len(ids) < request["limit"] else {"count": len(ids)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class PromptTokenizer:
    """Tokenizes chat messages or text for one model; a result that is an int is the token count
    of a prompt too long for `limit` (its ids are not kept)."""

    def __init__(self, tokenizer: Any, tokenizer_path: Path, limit: int) -> None:
        self._tokenizer = tokenizer
        self._path = tokenizer_path
        self._limit = limit
        # One thread: it bounds the CPU taken, and a fast tokenizer is not safe to call from
        # several threads at once.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._child: asyncio.subprocess.Process | None = None
        self._child_lock = asyncio.Lock()  # one exchange at a time on its pipes
        self._idle_timer: asyncio.TimerHandle | None = None

    async def chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int] | int:
        size = sum(len(str(v)) for m in messages for v in m.values())
        if size < LARGE_PROMPT_CHARS:
            return await self._here(lambda: chat_ids(self._tokenizer, messages, continue_final))
        return await self._in_child(True, messages, continue_final)

    async def text(self, text: str) -> list[int] | int:
        if len(text) < LARGE_PROMPT_CHARS:
            return await self._here(lambda: text_ids(self._tokenizer, text))
        return await self._in_child(False, text)

    async def _here(self, work: Callable[[], list[int]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def _in_child(self, chat: bool, payload: Any, continue_final: bool = False) -> list[int] | int:
        # "surrogatepass": a lone surrogate from JSON's \ud800 escapes travels as it came.
        body = (json.dumps(payload) if chat else payload).encode("utf-8", "surrogatepass")
        header = json.dumps({"chat": chat, "continue_final": continue_final, "limit": self._limit, "bytes": len(body)})
        header += "\n"
        request = header.encode() + body
        # Shielded: a client that leaves mid-exchange must not leave an answer unread on the pipe.
        answer = await asyncio.shield(asyncio.ensure_future(self._exchange(request)))
        if "rejected" in answer:
            raise invalid(str(answer["rejected"]), param="messages" if chat else "prompt")
        return [int(i) for i in answer["ids"]] if "ids" in answer else int(answer["count"])

    async def _exchange(self, request: bytes) -> dict[str, Any]:
        async with self._child_lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            try:
                return await self._over_pipes(request)
            finally:
                self._idle_timer = asyncio.get_running_loop().call_later(CHILD_IDLE_SECONDS, self._kill_if_idle)

    async def _over_pipes(self, request: bytes) -> dict[str, Any]:
        child = await self._started()
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(request)
            await child.stdin.drain()
            line = await child.stdout.readline()
            if not line:
                raise ConnectionError("the tokenizer process exited")
            answer: dict[str, Any] = json.loads(line)
            return answer
        except (OSError, ValueError) as exc:  # died (killed, out of memory): the next one starts afresh
            log.warning("tokenizer process failed: %s", exc)
            self._kill()
            raise EngineError(503, "The prompt could not be tokenized; retry.", code="engine_unavailable") from None

    async def _started(self) -> asyncio.subprocess.Process:
        if self._child is None or self._child.returncode is not None:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engines.tokenizing",
                str(self._path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=_PIPE_LIMIT,
            )
        return self._child

    def _kill_if_idle(self) -> None:
        if not self._child_lock.locked():  # else in use: that exchange arms the timer again
            self._kill()

    def _kill(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        self._child = None

    async def aclose(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
        child = self._child
        self._kill()
        if child is not None:
            await child.wait()


if __name__ == "__main__":
    _child_main(sys.argv[1])
