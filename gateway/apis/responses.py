"""OpenAI's Responses API over chat completions: the answer object and its SSE events.

Translated, a chat answer becomes a response whose `output` holds a message item (one
`output_text` part) and a `function_call` item per tool call; a stream becomes the Responses
events in their documented order, each with its `event:` line and a `sequence_number`:
response.created, response.in_progress, then per item output_item.added (content_part.added,
output_text.delta..., output_text.done, content_part.done | function_call_arguments.delta...,
function_call_arguments.done), output_item.done, and last response.completed (or
response.incomplete when the token limit cut it) carrying the whole response with its usage.
Native (the engine serves /v1/responses), the engine's own answer is relayed and read for its
usage and the final response; the gateway keeps the conversation state either way (the engine
is asked not to store, and gets the earlier turns inline instead of a previous_response_id).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.base import Translation, data_of, sse_events
from gateway.apis.chat import ChatStream, new_id, tokens
from gateway.apis.responses_input import ResponsesRequest, to_chat
from gateway.core.errors import GatewayError

_FINAL_EVENTS = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')


def response_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class ResponsesTranslation(Translation):
    api = "responses"
    native_path = "/v1/responses"

    def __init__(
        self, request: ResponsesRequest, history: list[dict[str, Any]], created_at: int, stream: bool | None = None
    ) -> None:
        super().__init__(request.body, to_chat(request, history), request.stream if stream is None else stream)
        self.request = request
        self.history = history
        self.id = new_id("resp_")
        self.created_at = created_at
        self.final: dict[str, Any] | None = None  # the whole response, once known (to store)
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._text_item: dict[str, Any] | None = None  # the message item being streamed
        self._text_prefix = b""
        self._tool_items: dict[int, dict[str, Any]] = {}  # chat tool index -> its open item

    @property
    def input_items(self) -> list[dict[str, Any]]:
        """The whole input of this turn: the earlier turns, then the new items."""
        return [*self.history, *self.request.items]

    def native_body(self, body: dict[str, Any]) -> None:
        body.pop("previous_response_id", None)
        body["input"] = self.input_items
        body["store"] = False  # the gateway stores, so every engine behind it can continue it
        if body.get("max_output_tokens") is None and self.chat.get("max_tokens"):
            body["max_output_tokens"] = self.chat["max_tokens"]  # the gateway's cap (auth.default_max_tokens)

    # The response object ------------------------------------------------------------------

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        body, request = self.request.body, self.request
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": request.store,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": request.user,
            "metadata": body.get("metadata") or {},
        }

    def _status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def _usage(self) -> dict[str, Any]:
        return response_usage(*tokens(self.usage))

    def from_chat(self, chat: ChatStream) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if chat.text or not chat.tools:
            item = _message(new_id("msg_"), chat.content, "completed")
            output.append(item)
        for tool in chat.tools:
            output.append(_function_call(new_id("fc_"), tool.id, tool.name, tool.arguments, "completed"))
        self.final = self._response(self._status(), output, self._usage())
        return self.final

    def read_native(self, answer: dict[str, Any]) -> None:
        self.final = answer
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
        self.finish_reason = "length" if answer.get("status") == "incomplete" else "stop"

    # Streams --------------------------------------------------------------------------------

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        event = {"type": kind, **payload, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    def opening(self) -> bytes:
        response = self._response("in_progress", [], None)
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def piece(self, piece: tuple[str, int, str]) -> bytes:
        kind, index, text = piece
        if kind == "text":
            out = b"" if self._text_item is not None else self._open_text()
            # The hot path: one event per token, its JSON written around the text alone.
            seq = self._seq
            self._seq += 1
            return out + self._text_prefix + orjson.dumps(text) + b',"sequence_number":%d}\n\n' % seq
        if kind == "tool":
            out = self._close_text()
            item = _function_call(new_id("fc_"), self._chat_stream.tools[index].id, text, "", "in_progress")
            self._tool_items[index] = item
            self._output.append(item)
            return out + self._event(
                "response.output_item.added", {"output_index": len(self._output) - 1, "item": dict(item)}
            )
        open_item = self._tool_items.get(index)
        if open_item is None:
            return b""
        return self._event(
            "response.function_call_arguments.delta",
            {"item_id": open_item["id"], "output_index": self._output.index(open_item), "delta": text},
        )

    def _open_text(self) -> bytes:
        item = _message(new_id("msg_"), "", "in_progress")
        item["content"] = []
        self._text_item = item
        self._output.append(item)
        index = len(self._output) - 1
        self._text_prefix = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","item_id":'
            + orjson.dumps(item["id"])
            + b',"output_index":%d,"content_index":0,"logprobs":[],"delta":' % index
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        return self._event("response.output_item.added", {"output_index": index, "item": dict(item)}) + self._event(
            "response.content_part.added",
            {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
        )

    def _close_text(self) -> bytes:
        item = self._text_item
        if item is None:
            return b""
        self._text_item = None
        text = self._chat_stream.content
        index = self._output.index(item)
        part = {"type": "output_text", "text": text, "annotations": []}
        item["content"], item["status"] = [part], "completed"
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return (
            self._event("response.output_text.done", {**common, "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**common, "part": part})
            + self._event("response.output_item.done", {"output_index": index, "item": item})
        )

    def closing(self, chat: ChatStream) -> bytes:
        out = [self._close_text()]
        for index, item in self._tool_items.items():
            item["arguments"] = chat.tools[index].arguments
            item["status"] = "completed"
            where = self._output.index(item)
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    {"item_id": item["id"], "output_index": where, "arguments": item["arguments"]},
                )
            )
            out.append(self._event("response.output_item.done", {"output_index": where, "item": item}))
        if not self._output:  # an empty answer is still a message
            out.append(self._open_text())
            out.append(self._close_text())
        status = self._status()
        self.final = self._response(status, self._output, self._usage())
        out.append(self._event(f"response.{status}", {"response": self.final}))
        return b"".join(out)

    def observe(self, block: bytes) -> bytes:
        self.events += block.count(b"output_text.delta")
        if any(marker in block for marker in _FINAL_EVENTS):
            for event in sse_events(block):
                data = data_of(event)
                if data is None or not any(marker in data for marker in _FINAL_EVENTS):
                    continue
                try:
                    payload = orjson.loads(data)
                except ValueError:
                    continue
                response = payload.get("response") if isinstance(payload, dict) else None
                if isinstance(response, dict):
                    self.read_native(response)
                    self.done = True
        return block

    def failed(self, error: GatewayError) -> bytes:
        code = None if error.code is None else str(error.code)
        return self._event("error", {"code": code, "message": error.message, "param": error.param})


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _function_call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
