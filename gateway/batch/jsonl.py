"""A stored file's bytes (parts of 1 MiB) as numbered lines, without ever holding more than one
line and one part: a line longer than the limit is reported as such and skipped, not buffered."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def numbered_lines(parts: AsyncIterable[bytes], max_line: int) -> AsyncIterator[tuple[int, bytes | None]]:
    """Yields (line number from 1, the line without its end of line), or (number, None) for a
    line longer than `max_line` bytes. Blank lines are yielded too (the caller skips them), so
    numbers are those an editor shows."""
    number = 0
    line = bytearray()
    too_long = False
    async for part in parts:
        start = 0
        while True:
            end = part.find(b"\n", start)
            if end < 0:
                if not too_long:
                    line += part[start:]
                    if len(line) > max_line:
                        too_long = True
                        line.clear()
                break
            number += 1
            if not too_long:
                line += part[start:end]
            yield number, None if too_long or len(line) > max_line else _strip_cr(line)
            line.clear()
            too_long = False
            start = end + 1
    if line or too_long:
        yield number + 1, None if too_long else _strip_cr(line)


def _strip_cr(line: bytearray) -> bytes:
    return bytes(line[:-1]) if line.endswith(b"\r") else bytes(line)
