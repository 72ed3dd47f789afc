"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with vLLM's requests, answers and errors.

Success is 200 with a plain-text sentence, as vLLM answers. Errors carry vLLM's body,
{"error": {"message", "type", "param": null, "code": <the HTTP status as an int>}}, with its
types: "InvalidUserInput" (400), "NotFoundError" (404), "BadRequestError" (400). Where vLLM
would answer 500 (files that are not an adapter of this model) this engine answers 400, as for
any bad input.

Paths are confined: a load request's `lora_path` must resolve (symlinks followed) inside one of
the `--lora-dir` directories; adapters given with `--lora-modules` at start are the operator's
own and exempt. Nothing is ever fetched: a path is a local directory holding
adapter_config.json and adapter_model.safetensors, or it is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from engines.http import read_body
from engines.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterLoadError, LoraAdapters

MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096
MAX_BODY_BYTES = 64 * 1024
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class LoraApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "InvalidUserInput") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": None, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


def _name(value: Any, field: str = "lora_name") -> str:
    if not isinstance(value, str) or not value:
        raise LoraApiError(400, f"'{field}' must be a non-empty string.")
    if len(value) > MAX_NAME_CHARS:
        raise LoraApiError(400, f"'{field}' is longer than {MAX_NAME_CHARS} characters.")
    if not value.isprintable():
        raise LoraApiError(400, f"'{field}' holds control characters.")
    return value


class LoraApi:
    def __init__(self, adapters: LoraAdapters, lora_dirs: list[Path]) -> None:
        self.adapters = adapters
        self.lora_dirs = [d.resolve() for d in lora_dirs]

    def confine(self, raw: Any, trusted: bool = False) -> Path:
        """The adapter directory `raw` names, refused (400/404) unless it is a safe local one."""
        if not isinstance(raw, str) or not raw:
            raise LoraApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if len(raw) > MAX_PATH_CHARS or "\x00" in raw or not raw.isprintable():
            raise LoraApiError(400, "'lora_path' is not a valid path.")
        if _URL.match(raw):
            raise LoraApiError(400, "'lora_path' must be a local directory: adapters are never fetched.")
        try:
            path = Path(raw).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a path the OS cannot take
            raise LoraApiError(400, "'lora_path' is not a valid path.") from None
        if not trusted and not any(path.is_relative_to(d) for d in self.lora_dirs):
            raise LoraApiError(400, "'lora_path' is outside the directories this engine loads adapters from.")
        return path

    def check_files(self, name: str, raw: str, path: Path) -> None:
        try:
            found = (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()
        except OSError:
            found = False
        if not found:  # vLLM's LoRAAdapterNotFoundError
            raise LoraApiError(404, f"Loading lora {name} failed: No adapter found for {raw}", type="NotFoundError")

    async def load(self, name: str, raw_path: str, replace: bool = False, trusted: bool = False) -> str:
        name = _name(name)
        if name == self.adapters.base_name:
            raise LoraApiError(400, f"The lora adapter '{name}' conflicts with a served base model.")
        if name in self.adapters and not replace:
            raise LoraApiError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
            )
        path = self.confine(raw_path, trusted)
        self.check_files(name, raw_path, path)
        try:
            await self.adapters.load(name, path, raw_path, replace)
        except AdapterLoadError as exc:
            raise LoraApiError(
                400, f"The lora adapter '{name}' could not be loaded: {exc}", type="BadRequestError"
            ) from None
        except ValueError:  # loaded meanwhile by a concurrent request
            raise LoraApiError(400, f"The lora adapter '{name}' has already been loaded.") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise LoraApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        if len(name) > MAX_NAME_CHARS or not await self.adapters.unload(name):
            shown = name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "..."
            raise LoraApiError(404, f"The lora adapter '{shown}' cannot be found.", type="NotFoundError")
        return f"Success: LoRA adapter '{name}' removed successfully."


async def _body(request: Request) -> dict[str, Any]:
    try:
        raw = await read_body(request, MAX_BODY_BYTES)
    except Exception:  # EngineError(413): answered in vLLM's shape here
        raise LoraApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LoraApiError(400, "The request body is not valid JSON.", type="BadRequestError") from None
    if not isinstance(body, dict):
        raise LoraApiError(400, "The request body must be a JSON object.", type="BadRequestError")
    return body


def routes(api: LoraApi | None) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """Handlers by path; without --enable-lora they answer 404, as vLLM has no such routes then."""

    async def load(request: Request) -> Response:
        try:
            if api is None:
                raise LoraApiError(404, "LoRA adapters are not enabled on this engine.", type="NotFoundError")
            body = await _body(request)
            replace = body.get("load_inplace", False)
            if not isinstance(replace, bool):
                raise LoraApiError(400, "'load_inplace' must be a boolean.", type="BadRequestError")
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                raise LoraApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
            return PlainTextResponse(await api.load(name, path, replace))
        except LoraApiError as exc:
            return exc.response()

    async def unload(request: Request) -> Response:
        try:
            if api is None:
                raise LoraApiError(404, "LoRA adapters are not enabled on this engine.", type="NotFoundError")
            body = await _body(request)
            return PlainTextResponse(await api.unload(body.get("lora_name")))
        except LoraApiError as exc:
            return exc.response()

    return {"/v1/load_lora_adapter": load, "/v1/unload_lora_adapter": unload}
