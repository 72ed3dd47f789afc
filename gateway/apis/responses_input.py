"""A Responses API request (`POST /v1/responses`), checked, and its input as chat messages.

`input` is a string or a list of items: messages (roles user, assistant, system, developer;
content a string or `input_text` / `output_text` / `input_image` parts), `function_call` and
`function_call_output` items. Items are kept in their list form, with ids, so a stored response
can give them back (`GET /v1/responses/{id}/input_items`) and a later `previous_response_id` can
prepend them. Fields the gateway has no use for pass to a native engine untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.apis.chat import new_id
from gateway.apis.checks import (
    MAX_NAME,
    MAX_TOKENS,
    MAX_TOOLS,
    json_schema,
    model_of,
    opt_bool,
    opt_int,
    opt_number,
    opt_str,
    str_map,
)
from gateway.core.errors import invalid

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text")
SKIPPED_ITEMS = ("reasoning",)  # nothing a chat model takes


@dataclass(slots=True)
class ResponsesRequest:
    body: dict[str, Any]
    model: str
    items: list[dict[str, Any]]  # the new input, as items
    instructions: str | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    user: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)  # as chat takes them


def parse_responses(body: dict[str, Any]) -> ResponsesRequest:
    model = model_of(body)
    request = ResponsesRequest(body, model, input_items(body.get("input")))
    request.instructions = opt_str(body, "instructions")
    request.stream = bool(opt_bool(body, "stream"))
    store = opt_bool(body, "store")
    request.store = True if store is None else store
    request.previous_response_id = opt_str(body, "previous_response_id", MAX_NAME)
    request.max_output_tokens = opt_int(body, "max_output_tokens", 1, MAX_TOKENS)
    request.user = opt_str(body, "user", MAX_NAME)
    opt_number(body, "temperature", 0.0, 2.0)
    opt_number(body, "top_p", 0.0, 1.0)
    opt_bool(body, "parallel_tool_calls")
    str_map(body.get("metadata"), "metadata", 16, 64, 512)
    request.tools = _tools(body.get("tools"))
    _tool_choice(body.get("tool_choice"))
    return request


def input_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [_message_item("user", [{"type": "input_text", "text": value}])]
    if not isinstance(value, list) or not value:
        raise invalid("'input' is required: a string or a non-empty array of items.", param="input")
    items = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"'{param}' must be an object.", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message(item, param))
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str) or (not item[name] and name != "arguments"):
                    raise invalid(f"'{param}.{name}' must be a string.", param=f"{param}.{name}")
            items.append({**item, "type": "function_call", "id": _id(item, "fc_"), "status": "completed"})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise invalid(f"'{param}.call_id' must be a string.", param=f"{param}.call_id")
            _text(item.get("output"), f"{param}.output")
            items.append({**item, "id": _id(item, "fco_"), "status": "completed"})
        elif kind in SKIPPED_ITEMS:
            items.append(item)
        else:
            raise invalid(f"'{param}.type' {str(kind)[:40]!r} is not supported here.", param=f"{param}.type")
    return items


def _id(item: dict[str, Any], prefix: str) -> str:
    value = item.get("id")
    return value if isinstance(value, str) and value else new_id(prefix)


def _message_item(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": new_id("msg_"), "role": role, "content": content, "status": "completed"}


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"'{param}.role' must be one of {', '.join(ROLES)}.", param=f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        parts = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    elif isinstance(content, list):
        parts = [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise invalid(f"'{param}.content' must be a string or an array of parts.", param=f"{param}.content")
    return {**item, "type": "message", "id": _id(item, "msg_"), "content": parts, "status": "completed"}


def _part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(f"'{param}' must be an object.", param=param)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise invalid(f"'{param}.{key}' must be a string.", param=f"{param}.{key}")
        return part
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise invalid(f"'{param}.image_url' must be a URL string.", param=f"{param}.image_url")
        return part
    raise invalid(f"'{param}.type' must be input_text, output_text or input_image.", param=f"{param}.type")


def _text(value: Any, param: str) -> str:
    """A string, or parts whose text is joined (a function_call_output may be either)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_part(p, f"{param}[{j}]").get("text", "") for j, p in enumerate(value))
    raise invalid(f"'{param}' must be a string or an array of text parts.", param=param)


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"'tools' must be an array of at most {MAX_TOOLS} tools.", param="tools")
    tools = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"'{param}' must be a function tool ({{type: function, name, parameters}}).", param=param)
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise invalid(f"'{param}.name' must be a string of 1 to {MAX_NAME} characters.", param=f"{param}.name")
        function: dict[str, Any] = {
            "name": name,
            "parameters": json_schema(tool.get("parameters"), f"{param}.parameters"),
        }
        description = opt_str(tool, "description", param=f"{param}.description")
        if description is not None:
            function["description"] = description
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> None:
    if value is None or value in ("auto", "none", "required"):
        return
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return
    raise invalid("'tool_choice' must be auto, none, required or {type: function, name}.", param="tool_choice")


def chat_tool_choice(value: Any) -> Any:
    if isinstance(value, dict):
        return {"type": "function", "function": {"name": value["name"]}}
    return value


def to_chat(request: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The request as a chat completions body: instructions first, then the earlier turns
    (`history`: a previous response's input and output), then the new input."""
    body = request.body
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    for item in (*history, *request.items):
        _append(messages, item)
    if not messages:
        raise invalid("'input' holds nothing a chat model can read.", param="input")
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    if request.tools:
        chat["tools"] = request.tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    return chat


def _append(messages: list[dict[str, Any]], item: dict[str, Any]) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item["role"]
        messages.append({"role": "system" if role == "developer" else role, "content": _chat_content(item["content"])})
    elif kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and (not last.get("content") or "tool_calls" in last):
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"], "output")})


def _chat_content(parts: Any) -> str | list[dict[str, Any]]:
    """Text only: one string (what every chat engine takes); with images, chat's parts."""
    if not isinstance(parts, list):
        return parts if isinstance(parts, str) else ""
    parts = [p for p in parts if isinstance(p, dict)]  # stored history is trusted, but stays readable
    if all(p.get("type") != "input_image" for p in parts):
        return "".join(p.get("text") or p.get("refusal") or "" for p in parts)
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.get("type") == "input_image":
            out.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            out.append({"type": "text", "text": p.get("text") or p.get("refusal") or ""})
    return out
