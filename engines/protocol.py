"""Validation of OpenAI request bodies into typed requests, so later code never sees raw input.

Unknown fields are ignored, as vLLM does, so that newer clients keep working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engines.errors import EngineError, invalid

MAX_N = 16
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    ignore_eos: bool
    min_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A chat request carries messages, a completion request one or more prompts (text or token ids)."""

    model: str
    stream: bool
    include_usage: bool
    sampling: SamplingParams
    messages: tuple[dict[str, str], ...] | None = None
    prompts: tuple[str | tuple[int, ...], ...] = ()
    continue_final_message: bool = False  # vLLM's: extend the last (assistant) message instead of starting a new one


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python, but not in JSON Schema: true is not a valid max_tokens.
    value_ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
    if not value_ok:
        names = " or ".join(_json_type(k) for k in kinds)
        raise invalid(f"'{name}' must be {names}, not {_json_type(type(value))}.", param=name)
    return value


def _json_type(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "an object",
    }.get(kind, kind.__name__)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}, got {value:g}.", param=name)
    return value


def _top_p(body: dict[str, Any]) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise invalid("'top_p' must be greater than 0.", param="top_p")
    return top_p


def _model(body: dict[str, Any]) -> str:
    model = _get(body, "model", str)
    if not model:
        raise invalid("'model' is required.", param="model")
    return model


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    return bool(_get(options, "include_usage", bool, False))


def _sampling(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> SamplingParams:
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _get(body, name, int)
        if max_tokens is not None:
            if max_tokens < 1:
                raise invalid(f"'{name}' must be at least 1, got {max_tokens}.", param=name)
            break
    stop = _get(body, "stop", (str, list), ())
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise invalid(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings.",
            param="stop",
        )
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"'n' must be between 1 and {MAX_N}, got {n}.", param="n")
    min_tokens = _get(body, "min_tokens", int, 0)
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise invalid("'min_tokens' must be between 0 and max_tokens.", param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        seed=_get(body, "seed", int),
        stop=tuple(stop),
        n=n,
        ignore_eos=_get(body, "ignore_eos", bool, False),
        min_tokens=min_tokens,
    )


def _message(index: int, message: Any) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"'{param}' must be an object.", param=param)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise invalid(f"'{param}.role' must be one of system, developer, user, assistant, tool.", param=param)
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):
        # Content parts: only text parts can reach a text model.
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"'{param}.content' parts must be text parts for this model.", param=param)
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"'{param}.content' must be a string or a list of text parts.", param=param)
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body: dict[str, Any]) -> GenerateRequest:
    model = _model(body)
    messages = _get(body, "messages", list)
    if not messages:
        raise invalid("'messages' must be a non-empty array.", param="messages")
    stream = _get(body, "stream", bool, False)
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    # vLLM's two switches, as the gateway uses them to resume a stream on another engine: the
    # last message is an assistant's partial answer, which the model goes on writing.
    extend = _get(body, "continue_final_message", bool, False)
    new_turn = _get(body, "add_generation_prompt", bool, True)
    if extend and new_turn:
        raise invalid(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true.", param="continue_final_message"
        )
    if extend and parsed[-1]["role"] != "assistant":
        raise invalid("'continue_final_message' needs an assistant message last.", param="continue_final_message")
    return GenerateRequest(
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        sampling=_sampling(body, ("max_completion_tokens", "max_tokens")),
        messages=parsed,
        continue_final_message=extend,
    )


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    def is_ids(item: Any) -> bool:
        return (
            isinstance(item, list)
            and bool(item)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
        )

    if isinstance(value, str):
        return (value,)
    if is_ids(value):
        return (tuple(value),)
    if isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
        return tuple(p if isinstance(p, str) else tuple(p) for p in value)
    raise invalid(
        "'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays.",
        param="prompt",
    )


def parse_completion(body: dict[str, Any]) -> GenerateRequest:
    model = _model(body)
    if body.get("prompt") is None:
        raise invalid("'prompt' is required.", param="prompt")
    prompts = _prompts(body["prompt"])
    stream = _get(body, "stream", bool, False)
    sampling = _sampling(body, ("max_tokens",))
    if sampling.max_tokens is None:
        # OpenAI's legacy completions default to 16 new tokens.
        sampling = SamplingParams(**{**_asdict(sampling), "max_tokens": 16})
    if len(prompts) * sampling.n > MAX_N:
        raise invalid(f"At most {MAX_N} choices per request (prompts x n).", param="n")
    return GenerateRequest(
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        sampling=sampling,
        prompts=prompts,
    )


def _asdict(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__slots__}


def parse_embedding(body: dict[str, Any]) -> EmbeddingRequest:
    model = _model(body)
    value = body.get("input")
    if isinstance(value, str):
        inputs: tuple[str, ...] = (value,)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = tuple(value)
    else:
        raise invalid("'input' must be a string or a non-empty array of strings.", param="input")
    if len(inputs) > 2048:
        raise invalid("'input' may hold at most 2048 strings.", param="input")
    encoding_format = _get(body, "encoding_format", str, "float")
    if encoding_format not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=encoding_format)


def model_not_found(model: str) -> EngineError:
    return EngineError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
