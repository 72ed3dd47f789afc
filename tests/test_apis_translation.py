"""The translations of gateway/apis/ on their own, against recorded exchanges
(tests/apis_exchanges/*.json, written from OpenAI's and Anthropic's documented shapes): the
client's request -> the chat request the engine gets; the chat answer, whole and streamed -> the
API's answer and events. Ids and times are masked (they are new per request)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.apis.base import Translation
from gateway.apis.messages import AnthropicError, MessagesTranslation
from gateway.apis.messages_input import parse_messages
from gateway.apis.responses import ResponsesTranslation
from gateway.apis.responses_input import parse_responses
from gateway.core.errors import Code, GatewayError

EXCHANGES = sorted((Path(__file__).parent / "apis_exchanges").glob("*.json"))
MASKED = ("id", "item_id")


def masked(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in MASKED and isinstance(v, str) and v.startswith(("resp_", "msg_", "fc_")):
                out[k] = "<id>"
            elif k == "created_at":
                out[k] = "<time>"
            else:
                out[k] = masked(v)
        return out
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def translation(exchange: dict[str, Any], stream: bool = False) -> Translation:
    body = {**exchange["request"], "stream": stream}
    if exchange["api"] == "responses":
        return ResponsesTranslation(parse_responses(body), [], 1_800_000_000)
    return MessagesTranslation(parse_messages(body))


def events_of(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        events.append((name[7:].decode(), json.loads(data[6:])))
    return events


@pytest.mark.parametrize("path", EXCHANGES, ids=lambda p: p.stem)
def test_whole_exchange(path: Path) -> None:
    exchange = json.loads(path.read_text())
    t = translation(exchange)
    route, body = t.upstream(False, "m")
    assert route == "/v1/chat/completions"
    assert json.loads(body) == exchange["chat_request"]
    answer = json.loads(t.whole(200, orjson.dumps(exchange["chat_answer"])))
    assert masked(answer) == exchange["answer"]
    assert t.usage == exchange["chat_answer"]["usage"] and t.done


@pytest.mark.parametrize("path", EXCHANGES, ids=lambda p: p.stem)
def test_streamed_exchange(path: Path) -> None:
    exchange = json.loads(path.read_text())
    t = translation(exchange, stream=True)
    _, body = t.upstream(False, "m")
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    raw = t.open()
    # The engine's bytes cut at arbitrary event boundaries, as the relay hands them over.
    chunks = [f"data: {c}\n\n".encode() for c in exchange["chat_stream"]]
    raw += t.feed(b"".join(chunks[:3])) + t.feed(b"".join(chunks[3:]))
    assert t.done and t.usage is not None
    events = events_of(raw)
    if exchange["api"] == "messages":
        assert [[name, masked(data)] for name, data in events] == exchange["stream_events"]
        return
    assert [name for name, _ in events] == exchange["stream_events"]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    whole = translation(exchange)
    whole.upstream(False, "m")
    expected = masked(json.loads(whole.whole(200, orjson.dumps(exchange["chat_answer"]))))
    assert masked(final) == expected  # the stream's final response is the whole answer
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert deltas == final["output"][0]["content"][0]["text"]


def test_native_responses_are_read_not_rewritten() -> None:
    request = {"model": "m", "input": "hi", "previous_response_id": "resp_old", "stream": True}
    t = ResponsesTranslation(parse_responses(request), [{"type": "message", "role": "user", "content": "before"}], 0)
    path, body = t.upstream(True, "engine-model")
    sent = json.loads(body)
    assert path == "/v1/responses" and sent["model"] == "engine-model" and sent["store"] is False
    assert "previous_response_id" not in sent and len(sent["input"]) == 2  # the history inline
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_x", "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 3}},
    }
    block = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"a"}\n\n'
        b"event: response.completed\ndata: " + orjson.dumps(completed) + b"\n\n"
    )
    assert t.feed(block) == block and t.done
    assert t.usage == {"prompt_tokens": 5, "completion_tokens": 3} and t.final == completed["response"]


def test_native_messages_stream_usage() -> None:
    t = MessagesTranslation(
        parse_messages({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": True})
    )
    assert t.upstream(True, "m")[0] == "/v1/messages"
    block = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":5}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert t.feed(block) == block and t.done
    assert t.usage == {"prompt_tokens": 7, "completion_tokens": 5} and t.finish_reason == "length"


def test_anthropic_errors() -> None:
    cases = [
        (GatewayError(400, "bad"), 400, "invalid_request_error"),
        (GatewayError(401, "who"), 401, "authentication_error"),
        (GatewayError(403, "no"), 403, "permission_error"),
        (GatewayError(404, "none"), 404, "not_found_error"),
        (GatewayError(413, "big"), 413, "request_too_large"),
        (GatewayError(429, "slow down", code=Code.RPM_EXCEEDED), 429, "rate_limit_error"),
        (GatewayError(429, "busy", code=Code.ENGINES_OVERLOADED), 529, "overloaded_error"),
        (GatewayError(503, "none up", code=Code.NO_HEALTHY_ENGINE), 529, "overloaded_error"),
        (GatewayError(502, "broke"), 500, "api_error"),
        (GatewayError(500, "bug"), 500, "api_error"),
    ]
    for error, status, kind in cases:
        mapped = AnthropicError(error)
        assert mapped.status == status
        assert json.loads(mapped.payload()) == {"type": "error", "error": {"type": kind, "message": error.message}}
    assert AnthropicError(GatewayError(429, "x")).headers["retry-after"]
    assert AnthropicError(GatewayError(500, "x")).sse().startswith(b"event: error\ndata: {")


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        ("responses", {"model": "m"}, "input"),
        ("responses", {"model": "m", "input": [{"type": "web_search"}]}, "input[0].type"),
        ("responses", {"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ("responses", {"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ("responses", {"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata"),
        ("responses", {"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ("messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            "messages",
            {"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "messages",
            {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
            "messages[0].content[0].type",
        ),
        (
            "messages",
            {"model": "m", "max_tokens": 1, "stop_sequences": [""], "messages": [{"role": "user", "content": "x"}]},
            "stop_sequences",
        ),
        (
            "messages",
            {
                "model": "m",
                "max_tokens": 1,
                "tool_choice": {"type": "tool"},
                "messages": [{"role": "user", "content": "x"}],
            },
            "tool_choice",
        ),
    ],
)
def test_bad_fields_name_themselves(api: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_responses(body) if api == "responses" else parse_messages(body)
    assert caught.value.status == 400 and caught.value.param == param
