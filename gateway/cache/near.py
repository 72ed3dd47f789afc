"""Cached answers this process keeps in its own memory too, so a hit it has seen costs no Redis
round trip: the entries it stored itself and those it read from Redis, least recently used first
out past `cache.local_memory` bytes, each dropped at its Redis TTL.

An entry is only ever kept under the model's current generation (gateway/cache/store.py): a
generation change (an admin invalidation, seen at once on the process that made it and within a
sync on the others, gateway/cache/service.py) drops the model's entries here. What an answer needs
to be replayed (its usage, finish reason, the stream it becomes) is worked out once per entry, on
its first hit, not on every hit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

from gateway.access.base import Usage
from gateway.cache.shapes import unfold

_OVERHEAD = 200  # bytes an entry costs beyond its answer (the entry, its digest, the dict slot)


class Entry:
    __slots__ = ("_streams", "body", "charged", "expires", "finish", "model", "parsed", "tokens", "usage")

    def __init__(self, model: str, body: bytes, expires: float) -> None:
        self.model = model
        self.body = body  # the whole JSON answer, replayed byte for byte
        self.expires = expires  # time.monotonic()
        self.parsed = False
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.tokens = 0  # of the answer: prompt and completion
        self.charged: Usage | None = None  # what a hit counts (gateway/cache/service.py sets it)
        self._streams: dict[tuple[bool, bool], bytes | None] = {}

    def parse(self) -> None:
        whole = orjson.loads(self.body)
        usage = whole.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        choices = whole.get("choices") or [{}]
        first = choices[0] if isinstance(choices, list) else None
        finish = first.get("finish_reason") if isinstance(first, dict) else None
        self.finish = finish if isinstance(finish, str) else None
        self.parsed = True

    def stream(self, chat: bool, with_usage: bool) -> bytes | None:
        """The answer as an SSE stream (None: it does not convert), built once per shape."""
        shape = (chat, with_usage)
        if shape not in self._streams:
            self._streams[shape] = unfold(orjson.loads(self.body), chat, with_usage)
        return self._streams[shape]


class NearCache:
    """Digest -> entry. An answer stored here and never asked again (most misses) is a plain
    tuple, no Entry and nothing for the garbage collector to follow; its first hit makes it one."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Entry | tuple[str, bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str, now: float) -> Entry | None:
        item = self._entries.get(digest)
        if item is None:
            return None
        if isinstance(item, tuple):
            if item[2] <= now:
                self._drop(digest)
                return None
            item = self._entries[digest] = Entry(*item)
        elif item.expires <= now:
            self._drop(digest)
            return None
        self._entries.move_to_end(digest)
        return item

    def put(self, digest: str, model: str, body: bytes, expires: float) -> None:
        size = len(body) + _OVERHEAD
        if size > self.max_bytes:
            return
        if digest in self._entries:
            self._drop(digest)
        self._entries[digest] = (model, body, expires)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def drop_model(self, model: str | None) -> None:
        """Forgets a model's entries (None: every model's)."""
        if model is None:
            self._entries.clear()
            self.bytes = 0
            return
        for digest in [d for d, e in self._entries.items() if (e[0] if isinstance(e, tuple) else e.model) == model]:
            self._drop(digest)

    def _drop(self, digest: str) -> None:
        item = self._entries.pop(digest)
        self.bytes -= len(item[1] if isinstance(item, tuple) else item.body) + _OVERHEAD
