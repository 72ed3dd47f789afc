from __future__ import annotations

import pytest

from engines.errors import EngineError
from engines.protocol import parse_chat, parse_completion, parse_embedding, parse_json


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_defaults_and_unknown_fields_ignored() -> None:
    r = parse_chat(chat(some_future_field=[1, 2], logprobs=False))
    assert r.sampling.temperature == 1.0 and r.sampling.n == 1 and r.sampling.max_tokens is None
    assert not r.stream and not r.include_usage


def test_max_completion_tokens_and_content_parts() -> None:
    r = parse_chat(
        {
            "model": "m",
            "max_completion_tokens": 7,
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        }
    )
    assert r.sampling.max_tokens == 7
    assert r.messages == ({"role": "system", "content": "ab"},)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 99}, "n"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_fields_name_the_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_chat(chat(**fields))
    assert info.value.status == 400 and info.value.param == param


def test_completion_prompts() -> None:
    assert parse_completion({"model": "m", "prompt": "x"}).sampling.max_tokens == 16
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompts == ((1, 2),)
    assert parse_completion({"model": "m", "prompt": ["a", [3]]}).prompts == ("a", (3,))
    with pytest.raises(EngineError):
        parse_completion({"model": "m", "prompt": [True]})


def test_json_and_embeddings() -> None:
    with pytest.raises(EngineError):
        parse_json(b"\xff")
    with pytest.raises(EngineError):
        parse_json(b'"string"')
    assert parse_embedding({"model": "e", "input": ["a", "b"]}).inputs == ("a", "b")
    with pytest.raises(EngineError):
        parse_embedding({"model": "e", "input": [1]})
