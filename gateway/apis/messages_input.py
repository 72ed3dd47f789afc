"""An Anthropic Messages request (`POST /v1/messages`, `/v1/messages/count_tokens`), checked, and
as a chat completions body.

Content is a string or blocks: `text`, `image` (base64 or URL source: a chat `image_url` part,
for engines that take images), `tool_use` (an assistant's tool call) and `tool_result` (its
answer, which becomes a chat `tool` message). `system` is a string or text blocks.
`metadata.user_id` is the request's subject (sticky routing), as chat's `user` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.apis.checks import MAX_NAME, MAX_TOKENS, MAX_TOOLS, json_schema, model_of, opt_bool, opt_int, opt_number
from gateway.core.errors import invalid

MAX_STOP_SEQUENCES = 16
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")


@dataclass(slots=True)
class MessagesRequest:
    body: dict[str, Any]
    model: str
    max_tokens: int
    stream: bool
    user: str | None
    chat: dict[str, Any]


def parse_messages(body: dict[str, Any], counting: bool = False) -> MessagesRequest:
    """The request checked and translated; `counting` (count_tokens) needs no max_tokens."""
    model = model_of(body)
    max_tokens = opt_int(body, "max_tokens", 1, MAX_TOKENS)
    if max_tokens is None and not counting:
        raise invalid("'max_tokens' is required: an integer from 1.", param="max_tokens")
    stream = bool(opt_bool(body, "stream"))
    opt_number(body, "temperature", 0.0, 1.0)
    opt_number(body, "top_p", 0.0, 1.0)
    opt_int(body, "top_k", 0, 1 << 20)
    metadata = body.get("metadata")
    user: str | None = None
    if metadata is not None:
        value = metadata.get("user_id") if isinstance(metadata, dict) else 0
        if not isinstance(metadata, dict) or (
            value is not None and (not isinstance(value, str) or len(value) > MAX_NAME)
        ):
            raise invalid(
                f"'metadata' must be an object; its 'user_id' a string of at most {MAX_NAME}.", param="metadata"
            )
        user = value
    messages = _system(body.get("system"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty array of messages.", param="messages")
    for i, message in enumerate(raw):
        _message(messages, message, f"messages[{i}]")
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    stop = body.get("stop_sequences")
    if stop is not None:
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise invalid(
                f"'stop_sequences' must be an array of at most {MAX_STOP_SEQUENCES} non-empty strings.",
                param="stop_sequences",
            )
        if stop:
            chat["stop"] = stop
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None and tools:
        chat["tool_choice"] = choice
    if user:
        chat["user"] = user
    return MessagesRequest(body, model, max_tokens or 1, stream, user, chat)


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if isinstance(value, list):
        texts = []
        for j, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise invalid(f"'system[{j}]' must be a text block.", param="system")
            texts.append(block["text"])
        return [{"role": "system", "content": "\n".join(texts)}] if texts else []
    raise invalid("'system' must be a string or an array of text blocks.", param="system")


def _message(out: list[dict[str, Any]], message: Any, param: str) -> None:
    if not isinstance(message, dict):
        raise invalid(f"'{param}' must be an object.", param=param)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise invalid(f"'{param}.role' must be user or assistant.", param=f"{param}.role")
    content = message.get("content")
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise invalid(f"'{param}.content' must be a string or an array of blocks.", param=f"{param}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        if not isinstance(block, dict):
            raise invalid(f"'{where}' must be an object.", param=where)
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_use" and role == "assistant":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise invalid(f"'{where}.input' must be an object.", param=f"{where}.input")
            name = _string(block, "name", where)
            function = {"name": name, "arguments": orjson.dumps(arguments).decode()}
            calls.append({"id": _string(block, "id", where), "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            out.append(
                {"role": "tool", "tool_call_id": _string(block, "tool_use_id", where), "content": _result(block, where)}
            )
        elif kind in SKIPPED_BLOCKS:
            continue
        else:
            raise invalid(
                f"'{where}.type' {str(kind)[:40]!r} is not supported in a {role} message.", param=f"{where}.type"
            )
    if parts or calls:
        entry: dict[str, Any] = {"role": role, "content": _content(parts) if parts else None}
        if calls:
            entry["tool_calls"] = calls
        out.append(entry)


def _string(block: dict[str, Any], name: str, where: str) -> str:
    value = block.get(name)
    if not isinstance(value, str) or (name != "text" and not value):
        raise invalid(f"'{where}.{name}' must be a string.", param=f"{where}.{name}")
    return value


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if isinstance(media, str) and isinstance(data, str) and media.startswith("image/"):
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise invalid(f"'{where}.source' must be a base64 image (media_type, data) or a url.", param=f"{where}.source")


def _result(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise invalid(f"'{where}.content[{k}]' must be a text or image block.", param=f"{where}.content")
            if part["type"] == "text":
                texts.append(_string(part, "text", f"{where}.content[{k}]"))
        return "".join(texts)
    raise invalid(f"'{where}.content' must be a string or an array of blocks.", param=f"{where}.content")


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"'tools' must be an array of at most {MAX_TOOLS} tools.", param="tools")
    tools = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"'{param}' must be an object.", param=param)
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise invalid(f"'{param}.name' must be a string of 1 to {MAX_NAME} characters.", param=f"{param}.name")
        if tool.get("type") not in (None, "custom"):
            raise invalid(
                f"'{param}.type' {str(tool.get('type'))[:40]!r} is not supported here.", param=f"{param}.type"
            )
        function: dict[str, Any] = {
            "name": name,
            "parameters": json_schema(tool.get("input_schema"), f"{param}.input_schema"),
        }
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise invalid(f"'{param}.description' must be a string.", param=f"{param}.description")
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(value.get("name"), str) and value["name"]:
        return {"type": "function", "function": {"name": value["name"]}}
    raise invalid("'tool_choice' must be {type: auto | any | none} or {type: tool, name}.", param="tool_choice")
