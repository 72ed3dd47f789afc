"""`POST /v1/files`: a multipart upload streamed into the store as it arrives.

python-multipart's streaming parser cuts the body into parts as the bytes come in; the `file`
part's bytes go straight to `Store.create_file`, which writes 1 MiB parts, so memory holds a
received chunk and a part at most, whatever the file's size. The official SDK (and OpenAI's own
curl examples) send `purpose` before `file`; when a client sends the file first, the file is
spooled to a temporary file (on disk past 1 MiB) until the purpose is known, then stored.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.batch.objects import UPLOAD_PURPOSES
from gateway.core.errors import Code, GatewayError, invalid
from gateway.core.request import too_large
from gateway.core.text import has_control
from gateway.store import FileRecord, FileTooLargeError, Owner, Store

MAX_FIELD_BYTES = 64 * 1024  # any part but the file
SPOOL_IN_MEMORY = 1 << 20
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file's own bytes
MAX_FILENAME = 255

# (kind, name or data, filename): a part begins, a piece of its data, a part ends
Event = tuple[str, bytes, str | None]


class _Parser:
    """python-multipart's callbacks turned into a list of events, drained after each write."""

    def __init__(self, boundary: bytes) -> None:
        self.events: list[Event] = []
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": lambda data, start, end: self.events.append(("data", bytes(data[start:end]), None)),
                "on_part_end": lambda: self.events.append(("end", b"", None)),
            },
        )

    def _begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        filename = options.get(b"filename")
        self.events.append(("part", options.get(b"name", b""), None if filename is None else _filename(filename)))


def _filename(raw: bytes) -> str:
    """The name as the client gave it (UTF-8, as browsers and SDKs send it), without any path."""
    name = raw.decode("utf-8", errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:MAX_FILENAME]


async def _events(body: AsyncIterable[bytes], boundary: bytes) -> AsyncGenerator[Event, None]:
    parser = _Parser(boundary)
    try:
        async for chunk in body:
            parser.parser.write(chunk)
            events, parser.events = parser.events, []
            for event in events:
                yield event
        parser.parser.finalize()
    except FormParserError as exc:
        raise invalid(f"The multipart body is malformed: {exc}") from None
    for event in parser.events:
        yield event


async def _part_data(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The data of the part that just began, up to its end (drawn from the shared event stream)."""
    async for kind, data, _ in events:
        if kind == "end":
            return
        if data:
            yield data
    raise invalid("The multipart body ended in the middle of a part.")


async def _spool(events: AsyncIterator[Event], spool: IO[bytes], max_bytes: int) -> None:
    size = 0
    async for data in _part_data(events):
        size += len(data)
        if size > max_bytes:
            raise FileTooLargeError(max_bytes)
        await asyncio.to_thread(spool.write, data)


async def _unspool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    await asyncio.to_thread(spool.seek, 0)
    while chunk := await asyncio.to_thread(spool.read, SPOOL_IN_MEMORY):
        yield chunk


def boundary_of(content_type: bytes | None) -> bytes:
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise invalid("Upload files as multipart/form-data with the fields 'file' and 'purpose'.")
    return boundary


def check_purpose(value: bytes) -> str:
    purpose = value.decode(errors="replace").strip()
    if purpose not in UPLOAD_PURPOSES:
        raise invalid(f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}; got {purpose!r}.", param="purpose")
    return purpose


async def receive_file(
    store: Store,
    owner: Owner,
    body: AsyncIterable[bytes],
    content_type: bytes | None,
    content_length: int | None,
    max_bytes: int,
) -> FileRecord:
    """Reads the multipart body and stores its `file` part under `purpose`. Raises GatewayError:
    400 for a malformed body or a missing or bad field, 413 past `max_bytes`."""
    boundary = boundary_of(content_type)
    if content_length is not None and content_length > max_bytes + MULTIPART_SLACK:
        raise too_large(max_bytes)
    events = _events(body, boundary)
    purpose: str | None = None
    record: FileRecord | None = None
    spooled: tuple[IO[bytes], str] | None = None
    try:
        async for kind, name, filename in events:
            if kind != "part":
                continue
            if name == b"file" and filename is not None:
                if record is not None or spooled is not None:
                    raise invalid("Send one file per upload.", param="file")
                filename = filename or "upload.jsonl"
                if has_control(filename):  # a NUL is refused by PostgreSQL, a CR or LF forges log lines
                    raise invalid("The file's name must not hold control characters.", param="file")
                if purpose is not None:
                    record = await store.create_file(owner, purpose, filename, _part_data(events), max_bytes=max_bytes)
                else:
                    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 (closed below)
                    spooled = (spool, filename)
                    await _spool(events, spool, max_bytes)
                continue
            value = bytearray()
            async for data in _part_data(events):
                value += data
                if len(value) > MAX_FIELD_BYTES:
                    raise invalid(f"The form field {name.decode(errors='replace')!r} is too large.")
            if name == b"purpose":
                purpose = check_purpose(bytes(value))
        if purpose is None:
            raise invalid("The form field 'purpose' is required.", param="purpose")
        if spooled is not None:
            record = await store.create_file(owner, purpose, spooled[1], _unspool(spooled[0]), max_bytes=max_bytes)
    except FileTooLargeError:
        raise too_large(max_bytes) from None
    finally:
        if spooled is not None:
            spooled[0].close()
        await events.aclose()
    if record is None:
        raise GatewayError(400, "The form field 'file' (a file) is required.", param="file", code=Code.INVALID_REQUEST)
    return record
