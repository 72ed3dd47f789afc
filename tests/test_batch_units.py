"""The parts of batch inference that need no process: lines of a stored file, line validation,
completion windows and metadata, the slots lines share, and an engine's answer as an outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.batch.dispatch import outcome_of
from gateway.batch.jsonl import numbered_lines
from gateway.batch.objects import check_metadata, format_window, parse_window
from gateway.batch.slots import Slots
from gateway.batch.validate import MAX_ERRORS, LineRules, valid_lines, validate_file
from gateway.core.errors import GatewayError
from gateway.core.request import CHAT, EMBEDDINGS
from gateway.store import BatchError


async def parts(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def lines_of(data: bytes, size: int, max_line: int = 100) -> list[tuple[int, bytes | None]]:
    async def main() -> list[tuple[int, bytes | None]]:
        return [item async for item in numbered_lines(parts(data, size), max_line)]

    return asyncio.run(main())


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_numbered_lines_whatever_the_part_size(size: int) -> None:
    data = b"one\r\ntwo\n\n" + b"x" * 150 + b"\nlast"
    assert lines_of(data, size) == [(1, b"one"), (2, b"two"), (3, b""), (4, None), (5, b"last")]
    assert lines_of(b"a\n" + b"y" * 101, size) == [(1, b"a"), (2, None)]
    assert lines_of(b"a\nb\n", size) == [(1, b"a"), (2, b"b")]
    assert lines_of(b"", size) == []


def line(custom_id: str = "a", **over: object) -> bytes:
    item: dict[str, object] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    }
    item.update(over)
    return orjson.dumps(item)


def check_model(model: str) -> BatchError | None:
    if model == "m":
        return None
    if model == "secret":
        return BatchError("model_not_allowed", "not this one")
    return BatchError("model_not_found", "no such model")


RULES = LineRules(CHAT, max_lines=5, max_line_bytes=400, check_model=check_model)


def errors_of(data: bytes, rules: LineRules = RULES) -> list[tuple[str, int | None]]:
    async def main() -> list[BatchError]:
        return await validate_file(parts(data, 64), rules)

    return [(e.code, e.line) for e in asyncio.run(main())]


def test_every_bad_line_is_named() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    data = b"\n".join(
        [
            line("a"),
            b"{not json",
            b"[1, 2]",
            line("b", method="GET"),
            line("c", url="/v1/embeddings"),
            b"",
            line("a"),
            line("d", body={**body, "stream": True}),
            line("e", body={**body, "model": "nope"}),
            line("f", body={**body, "model": "secret"}),
            line("g", body={"model": "m"}),
            line("", body=body),
            line("h", body="text"),
            line("i", body={**body, "padding": "x" * 400}),
        ]
    )
    wide = LineRules(CHAT, max_lines=100, max_line_bytes=400, check_model=check_model)
    assert errors_of(data, wide) == [
        ("invalid_json", 2),
        ("invalid_line", 3),
        ("invalid_method", 4),
        ("invalid_url", 5),
        ("duplicate_custom_id", 7),
        ("stream_not_supported", 8),
        ("model_not_found", 9),
        ("model_not_allowed", 10),
        ("invalid_body", 11),
        ("missing_custom_id", 12),
        ("missing_body", 13),
        ("line_too_large", 14),
    ]


def test_lines_nested_too_deeply_are_invalid() -> None:
    deep = b"[" * 300 + b"]" * 300  # orjson reads it, but cannot write it again
    body = b'{"model": "m", "messages": [{"role": "user", "content": ' + deep + b"}]}"
    data = b"\n".join(
        [
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + b"}",
            b'{"custom_id": "b", "method": ' + deep + b', "url": "/v1/chat/completions", "body": {}}',
            b'{"custom_id": "c", "method": "POST", "url": ' + deep + b', "body": {}}',
        ]
    )
    wide = LineRules(CHAT, max_lines=5, max_line_bytes=4000, check_model=check_model)
    assert errors_of(data, wide) == [("invalid_body", 1), ("invalid_method", 2), ("invalid_url", 3)]


def test_limits_on_lines_and_errors() -> None:
    assert errors_of(b"\n".join(line(str(i)) for i in range(6))) == [("too_many_lines", 6)]
    assert errors_of(b"\n\n") == [("empty_file", None)]
    many = LineRules(CHAT, max_lines=5000, max_line_bytes=400, check_model=check_model)
    errors = errors_of(b"\n".join(b"nope" for _ in range(MAX_ERRORS + 7)), many)
    assert len(errors) == MAX_ERRORS + 1 and errors[-1] == ("too_many_errors", None)
    embeddings = LineRules(EMBEDDINGS, max_lines=5, max_line_bytes=400, check_model=check_model)
    ok = orjson.dumps(
        {"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "a"}}
    )
    assert errors_of(ok, embeddings) == []
    assert errors_of(line("x"), embeddings) == [("invalid_url", 1)]


def test_valid_lines_are_stored_as_sent() -> None:
    async def main() -> list[tuple[str, dict[str, object]]]:
        data = b"\n".join([line("a"), b"  ", line("b")]) + b"\n"
        return [(n.custom_id, orjson.loads(n.body)) async for n in valid_lines(parts(data, 5), RULES)]

    stored = asyncio.run(main())
    assert [c for c, _ in stored] == ["a", "b"]
    assert stored[0][1] == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_completion_windows() -> None:
    assert parse_window("24h", 86400) == 86400 and format_window(86400) == "24h"
    assert parse_window("10s", 1) == 10 and format_window(10) == "10s"
    assert parse_window("2m", 60) == 120 and format_window(120) == "2m"
    assert parse_window("2d", 86400) == 172800 and format_window(172800) == "48h"
    for bad in ("1h", "24", "24 h", "0s", "31d", 24, None, "1.5h"):
        with pytest.raises(GatewayError) as info:
            parse_window(bad, 86400)
        assert info.value.status == 400 and info.value.param == "completion_window"


def test_metadata_rules() -> None:
    assert check_metadata(None) is None
    assert check_metadata({"team": "a"}) == {"team": "a"}
    for bad in ({"k": 1}, {"k" * 65: "v"}, {"k": "v" * 513}, {str(i): "v" for i in range(17)}, ["a"]):
        with pytest.raises(GatewayError) as info:
            check_metadata(bad)
        assert info.value.param == "metadata"


def test_slots_are_shared_and_a_halted_wait_ends() -> None:
    async def main() -> None:
        slots = Slots(2)
        running, halted = asyncio.Event(), asyncio.Event()
        assert await slots.take(running) and await slots.take(running)
        waiter = asyncio.create_task(slots.take(running))
        stopped = asyncio.create_task(slots.take(halted))
        await asyncio.sleep(0.01)
        assert not waiter.done() and not stopped.done()
        halted.set()
        slots.wake_all()
        assert await stopped is False and not waiter.done()
        slots.give()
        assert await waiter is True and slots.free == 0
        slots.give()
        slots.give()
        assert slots.free == 2

    asyncio.run(main())


def test_an_engine_answer_as_a_line_outcome() -> None:
    ok = outcome_of(200, b'{"choices": []}', "rid")
    assert not ok.failed and ok.status_code == 200 and ok.body == '{"choices": []}'
    refused = outcome_of(400, b'{"error": {"message": "too long", "type": "invalid_request_error", "code": null}}', "r")
    assert refused.failed and refused.error_code == "invalid_request_error" and refused.error_message == "too long"
    assert refused.status_code == 400 and refused.body is not None
    garbled = outcome_of(200, b"<html>", "r")
    assert garbled.failed and garbled.error_code == "invalid_response" and garbled.body is None
