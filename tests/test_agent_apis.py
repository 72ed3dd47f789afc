"""The Responses and Messages APIs end to end, with the official clients unchanged: the `openai`
SDK, the OpenAI Agents SDK and the `anthropic` SDK against a gateway with keys on (a private
Redis), translating to chat completions for the CPU engine (tiny model) and for a fake engine
scripted to call tools (testkit/fake_upstream.py --tools), so tool use is shown both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.ci import require
from testkit.keyed import admin, create_key, start_gateway
from testkit.procs import TINY_MODEL, Proc, fake_upstream
from testkit.redis_server import RedisServer

try:
    import agents
    import anthropic
    import openai
except ImportError:  # the dev extra (pyproject) installs them
    agents = anthropic = openai = None  # type: ignore[assignment]

TINY = "tiny-llama"


@pytest.fixture(scope="module")
def tools_engine(logs_dir: Path) -> Iterator[Proc]:
    proc = fake_upstream(logs_dir, "--model", "tools", "--tools", name="fake-tools").start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gw(logs_dir: Path, redis_session: RedisServer, tiny_worker: Proc, tools_engine: Proc) -> Iterator[Proc]:
    require(agents is not None and anthropic is not None, "openai-agents and anthropic (the dev extra)")
    cfg: dict[str, Any] = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.up().url},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "store": {"url": f"sqlite:///{logs_dir / 'agent-apis.db'}"},
        "inference_log": {"flush_interval": 0.2},
        "engines": [
            {"name": "tiny", "kind": "openai", "url": tiny_worker.url},
            # Says it serves vLLM's extra endpoints (the fake answers any path), the CPU engine does not.
            {
                "name": "tools",
                "kind": "openai",
                "url": tools_engine.url,
                "apis": ["tokenize", "rerank", "score", "audio"],
            },
        ],
        "models": [
            {"name": TINY, "routes": [{"engine": "tiny", "model": TINY}], "tokenizer": str(TINY_MODEL)},
            {"name": "tools", "routes": [{"engine": "tools", "model": "tools-upstream"}]},
        ],
    }
    proc = start_gateway(logs_dir, cfg, "agent-apis")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def key(gw: Proc) -> tuple[str, str]:
    return create_key(gw)


def oai(gw: Proc, secret: str) -> Any:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=60)


def claude(gw: Proc, secret: str) -> Any:
    return anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=60)


def test_responses_with_the_openai_sdk(gw: Proc, key: tuple[str, str]) -> None:
    key_id, secret = key
    client = oai(gw, secret)
    first = client.responses.create(model=TINY, input="Once upon a time", max_output_tokens=8)
    assert first.id.startswith("resp_") and first.object == "response"
    assert first.status in ("completed", "incomplete") and first.output_text
    assert (
        first.usage.output_tokens <= 8
        and first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    )
    # Stored (the default): retrieved as it was answered, with the input it answered.
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    items = client.responses.input_items.list(first.id)
    assert [i.content[0].text for i in items.data] == ["Once upon a time"]
    # A second turn carries the first: its input is the earlier turns plus the new one.
    second = client.responses.create(
        model=TINY, input="and then", previous_response_id=first.id, instructions="Be brief.", max_output_tokens=4
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the history was sent
    turns = client.responses.input_items.list(second.id, order="asc").data
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    # Streamed: the documented events, in order, each with its `event:` line and sequence number.
    with client.responses.create(model=TINY, input="The sea", max_output_tokens=6, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        events[-1].type,
    ]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas and final.usage.output_tokens <= 6
    assert client.responses.retrieve(final.id).output_text == deltas
    raw = httpx.post(
        gw.url + "/v1/responses",
        json={"model": TINY, "input": "x", "stream": True, "max_output_tokens": 2},
        headers={"authorization": f"Bearer {secret}"},
    )
    assert raw.text.startswith("event: response.created\ndata: {")
    # Deleted: gone for good.
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # Accounting: the key was charged exactly what the answers said.
    spent = first.usage.total_tokens + second.usage.total_tokens + final.usage.total_tokens
    spent += _tokens_of_raw_stream(raw.text)
    usage = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == spent


def _tokens_of_raw_stream(text: str) -> int:
    import json

    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    return int(json.loads(last[6:])["response"]["usage"]["total_tokens"])


def test_stored_responses_belong_to_their_key(gw: Proc, key: tuple[str, str]) -> None:
    _, secret = key
    _, other = create_key(gw)
    made = oai(gw, secret).responses.create(model="tools", input="hello")
    stranger = oai(gw, other)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model="tools", input="go on", previous_response_id=made.id)
    assert oai(gw, secret).responses.retrieve(made.id).id == made.id  # still there for its owner
    # Not stored when asked not to be.
    unstored = oai(gw, secret).responses.create(model="tools", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        oai(gw, secret).responses.retrieve(unstored.id)


def test_responses_tool_calls_both_ways(gw: Proc, key: tuple[str, str]) -> None:
    _, secret = key
    client = oai(gw, secret)
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    asked = client.responses.create(model="tools", input="capital of France?", tools=tools)
    call = asked.output[0]
    assert call.type == "function_call" and call.name == "lookup" and call.call_id == "call_fake1"
    assert call.arguments == '{"query": "capital of France?"}'
    answered = client.responses.create(
        model="tools",
        previous_response_id=asked.id,
        tools=tools,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Paris"}],
    )
    assert answered.output_text == "tool said: Paris"
    # Streamed: the function call's item and its argument deltas.
    with client.responses.create(model="tools", input="where?", tools=tools, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"query": "where?"}'
    assert events[-1].response.output[0].type == "function_call"


def test_an_agent_runs_with_a_function_tool(gw: Proc, key: tuple[str, str]) -> None:
    _, secret = key
    agents.set_tracing_disabled(True)
    called: list[str] = []

    @agents.function_tool
    def lookup(query: str) -> str:
        """Look something up."""
        called.append(query)
        return "forty-two"

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    # The scripted engine calls the tool, then answers with what the tool returned.
    agent = agents.Agent(
        name="helper",
        instructions="Use the tool.",
        tools=[lookup],
        model=agents.OpenAIResponsesModel(model="tools", openai_client=client),
    )
    result = agents.Runner.run_sync(agent, "what is the answer?")
    assert called == ["what is the answer?"]
    assert result.final_output == "tool said: forty-two"
    # The CPU engine's tiny model: a plain answer, through the same translation.
    tiny = agents.Agent(
        name="tiny",
        instructions="Tell a story.",
        tools=[lookup],
        model=agents.OpenAIResponsesModel(model=TINY, openai_client=client),
        model_settings=agents.ModelSettings(max_tokens=512),  # the tiny model ends its stories well before
    )
    assert isinstance(agents.Runner.run_sync(tiny, "Once upon a time").final_output, str)


def test_messages_with_the_anthropic_sdk(gw: Proc, key: tuple[str, str]) -> None:
    key_id, secret = key
    before = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    client = claude(gw, secret)
    message = client.messages.create(
        model=TINY,
        max_tokens=8,
        system="You tell stories.",
        messages=[{"role": "user", "content": "Once upon a time"}],
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and 0 < message.usage.output_tokens <= 8
    with client.messages.stream(
        model=TINY, max_tokens=6, messages=[{"role": "user", "content": [{"type": "text", "text": "The sea"}]}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == final.content[0].text and final.usage.output_tokens <= 6
    assert final.usage.input_tokens > 0
    counted = client.messages.count_tokens(model=TINY, messages=[{"role": "user", "content": "Once upon a time"}])
    assert counted.input_tokens > 0
    after = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    spent = sum(m.usage.input_tokens + m.usage.output_tokens for m in (message, final))
    assert (
        after["prompt_tokens"] + after["completion_tokens"] - before["prompt_tokens"] - before["completion_tokens"]
        == spent
    )
    # Anthropic's clients send the key as x-api-key; bearer works too, and errors are Anthropic's.
    r = httpx.post(
        gw.url + "/v1/messages",
        json={"model": "tools", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required: an integer from 1."},
    }
    with pytest.raises(anthropic.AuthenticationError) as bad:
        claude(gw, "sk-not-a-key").messages.create(
            model=TINY, max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["type"] == "error"


def test_messages_tool_use_both_ways(gw: Proc, key: tuple[str, str]) -> None:
    _, secret = key
    client = claude(gw, secret)
    tools = [{"name": "lookup", "description": "Look up", "input_schema": {"type": "object", "properties": {}}}]
    asked = client.messages.create(
        model="tools", max_tokens=64, tools=tools, messages=[{"role": "user", "content": "capital of France?"}]
    )
    use = asked.content[0]
    assert asked.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "lookup"
    assert use.input == {"query": "capital of France?"}
    answered = client.messages.create(
        model="tools",
        max_tokens=64,
        tools=tools,
        messages=[
            {"role": "user", "content": "capital of France?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Paris"}]},
        ],
    )
    assert answered.content[0].text == "tool said: Paris" and answered.stop_reason == "end_turn"
    with client.messages.stream(
        model="tools", max_tokens=64, tools=tools, messages=[{"role": "user", "content": "where?"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"query": "where?"}


def test_api_label_in_metrics_and_log(gw: Proc, key: tuple[str, str]) -> None:
    _, secret = key
    oai(gw, secret).responses.create(model="tools", input="hello", store=False)
    claude(gw, secret).messages.create(model="tools", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    text = httpx.get(gw.url + "/metrics").text
    assert 'api="responses"' in text and 'api="messages"' in text
    import time

    deadline = time.monotonic() + 20
    apis: set[str] = set()
    while time.monotonic() < deadline and not {"responses", "messages"} <= apis:
        rows = admin(gw, "GET", "/admin/requests?limit=200").json()["data"]
        apis = {r["api"] for r in rows}
        time.sleep(0.2)
    assert {"responses", "messages"} <= apis
    only = admin(gw, "GET", "/admin/requests?api=messages&limit=200").json()["data"]
    assert only and {r["api"] for r in only} == {"messages"}


def test_vllm_endpoints_pass_through_with_keys(gw: Proc, key: tuple[str, str]) -> None:
    key_id, secret = key
    auth = {"authorization": f"Bearer {secret}"}
    before = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    for path in ("/tokenize", "/detokenize", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/score"):
        r = httpx.post(
            gw.url + path, json={"model": "tools", "prompt": "hi", "query": "q", "documents": ["d"]}, headers=auth
        )
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-gateway-route"] == "v1"
        refused = httpx.post(gw.url + path, json={"model": TINY, "prompt": "hi"}, headers=auth)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "endpoint_not_served"
        assert path in refused.json()["error"]["message"]
        assert httpx.post(gw.url + path, json={"model": "tools"}).status_code == 401
    after = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    # The scripted engine reports 11 prompt and 5 completion tokens for every answer.
    assert after["prompt_tokens"] - before["prompt_tokens"] == 6 * 11
    assert after["completion_tokens"] - before["completion_tokens"] == 6 * 5
    assert 'api="rerank"' in httpx.get(gw.url + "/metrics").text


def test_audio_uploads_pass_through_with_keys(gw: Proc, key: tuple[str, str]) -> None:
    key_id, secret = key
    client = oai(gw, secret)
    before = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    audio = b"RIFF" + bytes(range(256)) * 40
    text = client.audio.transcriptions.create(model="tools", file=("a.wav", audio), language="en")
    assert text.text == f"model=tools-upstream bytes={len(audio)}"  # the model rewritten, the file intact
    text = client.audio.translations.create(model="tools", file=("a.wav", audio))
    assert text.text.startswith("model=tools-upstream")
    after = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()["day"]
    assert after["requests"] - before["requests"] == 2 and after["completion_tokens"] - before["completion_tokens"] == 8
    with pytest.raises(openai.NotFoundError) as refused:
        client.audio.transcriptions.create(model=TINY, file=("a.wav", audio))
    assert refused.value.code == "endpoint_not_served"
    auth = {"authorization": f"Bearer {secret}"}
    r = httpx.post(
        gw.url + "/v1/audio/transcriptions", content=b"{}", headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gw.url + "/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
