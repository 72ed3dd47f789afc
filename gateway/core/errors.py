"""The gateway's one error type and its codes, mapped once to an OpenAI JSON body and once to an SSE event.

Every refusal the gateway makes is a `GatewayError` raised where the problem is found; the front
middleware (gateway/front/middleware.py) turns it into a response, the relay into an in-band event.
Codes are constants here, so a code is never spelled two ways and one wording serves every path.
"""

from __future__ import annotations

from enum import StrEnum

import orjson

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class Code(StrEnum):
    # the request itself
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    REQUEST_TOO_LARGE = "request_too_large"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    # who is calling
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    NOT_ADMIN = "not_admin"
    ADMIN_DISABLED = "admin_disabled"
    KEY_NOT_FOUND = "key_not_found"
    # quotas
    RPM_EXCEEDED = "rpm_exceeded"
    TPM_EXCEEDED = "tpm_exceeded"
    CONCURRENCY_EXCEEDED = "concurrency_exceeded"
    DAILY_TOKENS_EXCEEDED = "daily_tokens_exceeded"
    MONTHLY_TOKENS_EXCEEDED = "monthly_tokens_exceeded"
    QUOTA_UNAVAILABLE = "quota_unavailable"
    BUDGET_EXCEEDED = "budget_exceeded"  # money, per day or month (the message says which)
    # the same limits of a key's team and organization (gateway/access/levels.py)
    TEAM_RPM_EXCEEDED = "team_rpm_exceeded"
    TEAM_TPM_EXCEEDED = "team_tpm_exceeded"
    TEAM_CONCURRENCY_EXCEEDED = "team_concurrency_exceeded"
    TEAM_DAILY_TOKENS_EXCEEDED = "team_daily_tokens_exceeded"
    TEAM_MONTHLY_TOKENS_EXCEEDED = "team_monthly_tokens_exceeded"
    TEAM_BUDGET_EXCEEDED = "team_budget_exceeded"
    ORG_RPM_EXCEEDED = "org_rpm_exceeded"
    ORG_TPM_EXCEEDED = "org_tpm_exceeded"
    ORG_CONCURRENCY_EXCEEDED = "org_concurrency_exceeded"
    ORG_DAILY_TOKENS_EXCEEDED = "org_daily_tokens_exceeded"
    ORG_MONTHLY_TOKENS_EXCEEDED = "org_monthly_tokens_exceeded"
    ORG_BUDGET_EXCEEDED = "org_budget_exceeded"
    # teams, organizations, roles
    TEAM_NOT_FOUND = "team_not_found"
    ORG_NOT_FOUND = "org_not_found"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    CSRF_FAILED = "csrf_failed"
    # engines
    NO_HEALTHY_ENGINE = "no_healthy_engine"
    ENGINES_OVERLOADED = "engines_overloaded"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt over the bound
    # the scheduler (every engine of the model full)
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    # files and batches
    FILE_NOT_FOUND = "file_not_found"
    BATCH_NOT_FOUND = "batch_not_found"
    INVALID_FILE_PURPOSE = "invalid_file_purpose"
    BATCH_NOT_CANCELLABLE = "batch_not_cancellable"
    BATCH_LINE_SUPERSEDED = "batch_line_superseded"  # a run of an older claim (never reaches a client)
    STORE_UNAVAILABLE = "store_unavailable"
    # the Responses API's stored responses; an engine that does not serve an endpoint
    RESPONSE_NOT_FOUND = "response_not_found"
    ENDPOINT_NOT_SERVED = "endpoint_not_served"
    # the gateway
    INTERNAL_ERROR = "internal_error"
    # a configuration reload (gateway/front/reloads.py)
    INVALID_CONFIG = "invalid_config"
    RESTART_REQUIRED = "restart_required"
    RELOAD_FAILED = "reload_failed"
    RELOAD_UNAVAILABLE = "reload_unavailable"
    # the connection and the server's life (gateway/front/http11.py, gateway/proxy/drain.py)
    HEADERS_TOO_LARGE = "headers_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"
    ENGINE_STARTING = "engine_starting"


RATE_LIMITS = frozenset({Code.RPM_EXCEEDED, Code.TPM_EXCEEDED, Code.CONCURRENCY_EXCEEDED})
BUDGETS = frozenset(
    {
        Code.DAILY_TOKENS_EXCEEDED,
        Code.MONTHLY_TOKENS_EXCEEDED,
        Code.BUDGET_EXCEEDED,
        Code.TEAM_DAILY_TOKENS_EXCEEDED,
        Code.TEAM_MONTHLY_TOKENS_EXCEEDED,
        Code.TEAM_BUDGET_EXCEEDED,
        Code.ORG_DAILY_TOKENS_EXCEEDED,
        Code.ORG_MONTHLY_TOKENS_EXCEEDED,
        Code.ORG_BUDGET_EXCEEDED,
    }
)


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Code | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or STATUS_TYPES.get(status, "server_error")
        self.headers = dict(headers or {})
        if status in (429, 503) and "retry-after" not in self.headers:
            self.headers["retry-after"] = "1"

    def body(self) -> dict[str, object]:
        code = None if self.code is None else str(self.code)
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}

    def payload(self) -> bytes:
        return orjson.dumps(self.body())

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in self.headers.items())]

    def sse(self) -> bytes:
        """The same error in-band, for a stream whose headers are gone: an event, then [DONE]."""
        return b"data: " + self.payload() + b"\n\ndata: [DONE]\n\n"


def invalid(message: str, param: str | None = None, code: Code = Code.INVALID_REQUEST) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model '{model}' does not exist.", param="model", code=Code.MODEL_NOT_FOUND)


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        403, f"This API key may not use the model '{model}'.", param="model", code=Code.MODEL_NOT_ALLOWED
    )


def invalid_key(detail: str = "Incorrect, revoked or expired API key.") -> GatewayError:
    # Never echo the secret, not even in part.
    return GatewayError(401, detail, code=Code.INVALID_API_KEY)


def quota_unavailable() -> GatewayError:
    return GatewayError(503, "The quota store (Redis) is unavailable; retry shortly.", code=Code.QUOTA_UNAVAILABLE)


def internal_error() -> GatewayError:
    return GatewayError(500, "Internal error in the gateway.", code=Code.INTERNAL_ERROR)
