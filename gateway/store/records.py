"""The rows the store takes and returns: small frozen dataclasses, free of any driver's types.

Timestamps are Unix seconds from the gateway's clock: whole seconds on files and batches (as
OpenAI's objects carry them), floats on leases, claims and the inference log. JSON documents
travel as JSON text (request and response bodies, payloads): the store keeps them as they are
and never re-encodes them; small structured values (metadata, errors) are Python objects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
FINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
# Statuses in which a batch needs a runner: run its lines, finish cancelling, redo a finalize
# that crashed half-way, or move it out of validating.
LEASABLE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE_STATUSES = ("validating", "in_progress")
# A batch still in one of these after its expires_at has expired.
EXPIRABLE_STATUSES = ("validating", "in_progress")

FILE_PROCESSED = "processed"
FILE_UPLOADING = "uploading"  # parts still arriving: invisible to get, list and content

T = TypeVar("T")


class AllOwners(enum.Enum):
    ALL = "all"


ALL_OWNERS = AllOwners.ALL
"""Pass as `owner` for the admin's view: every owner's files and batches."""

Owner = str | None
"""An API key id, or None when auth is off (then everything belongs to nobody, and all see it)."""
OwnerScope = str | None | Literal[AllOwners.ALL]


class StoreError(Exception):
    """The store refused an operation whose input breaks one of its rules."""


class FileTooLargeError(StoreError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file exceeds the limit of {limit} bytes")
        self.limit = limit


class DuplicateCustomIdError(StoreError):
    def __init__(self) -> None:
        super().__init__("two lines of the batch share a custom_id")


class UnfinishedLinesError(StoreError):
    def __init__(self, batch_id: str, count: int) -> None:
        super().__init__(f"batch {batch_id} still has {count} lines that are neither done nor failed")
        self.count = count


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: `has_more` says whether a next page exists (OpenAI's field)."""

    items: list[T]
    has_more: bool


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: Owner
    purpose: str
    filename: str
    bytes: int
    created_at: int
    status: str


@dataclass(frozen=True)
class BatchError:
    """One entry of a batch's `errors.data` (validation errors name the input line)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


@dataclass(frozen=True)
class BatchSpec:
    """What a client asks for in `POST /v1/batches`, validated by the caller."""

    owner: Owner
    endpoint: str
    input_file_id: str
    completion_window: int  # seconds
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Batch:
    id: str
    owner: Owner
    endpoint: str
    input_file_id: str
    completion_window: int
    metadata: dict[str, Any] | None
    status: str
    errors: tuple[BatchError, ...]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    lease_holder: str | None
    lease_expires: float | None


@dataclass(frozen=True)
class NewLine:
    """One input line of a batch: its custom_id and the request `body` as JSON text."""

    custom_id: str
    body: str


@dataclass(frozen=True)
class ClaimedLine:
    """A line handed to one runner; `claim_token` must come back with its result."""

    batch_id: str
    line: int  # 1-based position in the input
    custom_id: str
    body: str
    attempts: int  # this claim included
    claim_token: str


@dataclass(frozen=True)
class LineOutcome:
    """The result of one line. A line with an `error_code` failed and goes to the error file,
    with its HTTP response too when one came back; the others go to the output file."""

    status_code: int | None = None
    request_id: str | None = None
    body: str | None = None  # the response body as JSON text
    error_code: str | None = None
    error_message: str | None = None
    # What the run was charged: added to the spend rollups when, and only when, the result is written.
    spend: SpendRow | None = None

    @classmethod
    def success(cls, status_code: int, request_id: str | None, body: str) -> LineOutcome:
        return cls(status_code=status_code, request_id=request_id, body=body)

    @classmethod
    def failure(
        cls,
        code: str,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        body: str | None = None,
        spend: SpendRow | None = None,
    ) -> LineOutcome:
        return cls(status_code, request_id, body, code, message, spend)

    @property
    def failed(self) -> bool:
        return self.error_code is not None


@dataclass(frozen=True)
class InferenceRecord:
    """One row of the inference log. `id` is set by the store (None on rows not yet written)."""

    time: float
    request_id: str
    model: str
    status: int
    duration: float
    key_id: str | None = None
    route: str | None = None
    engine: str | None = None
    error_code: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    finish_reason: str | None = None
    client_disconnect: bool = False
    batch_id: str | None = None
    payload: str | None = None  # sampled request/response capture, JSON text
    id: int | None = None
    api: str | None = None  # chat, completions, embeddings, responses, messages, ... (None: rows before it)


@dataclass(frozen=True)
class StoredResponse:
    """A stored Responses API answer: the response object and the input items it answered."""

    id: str
    owner: str | None
    created_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


@dataclass(frozen=True)
class RequestFilter:
    """Filters of `GET /admin/requests`; None means any. Times are Unix seconds, `until` exclusive."""

    key_id: str | None = None
    model: str | None = None
    route: str | None = None
    status: int | None = None
    since: float | None = None
    until: float | None = None
    api: str | None = None  # chat, completions, embeddings, responses, messages, ...


class ReportRow(NamedTuple):
    """The columns a model report needs, per request."""

    time: float
    route: str | None
    status: int
    ttft: float | None
    duration: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass(frozen=True)
class SpendRow:
    """One hour of one key's use of one model through one route ("" where there is none)."""

    hour: int  # Unix seconds at the start of the hour (UTC)
    key_id: str
    team_id: str
    org_id: str
    model: str
    route: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    spend: int  # nano-units of the pricing currency


SPEND_GROUPS = ("key", "team", "org", "model", "route", "day", "hour")


@dataclass(frozen=True)
class SpendQuery:
    group_by: tuple[str, ...]  # some of SPEND_GROUPS
    since: float
    until: float
    teams: tuple[str, ...] | None = None  # only these teams (a team admin's view)
    key_id: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One admin change: who (and in which role, through what, from where), what, before and after
    (JSON without secrets), when."""

    time: float
    actor: str
    role: str
    via: str
    address: str
    action: str  # e.g. key.create, team.update, routes.put
    target: str  # the id or name of what changed
    team: str | None  # the team the change concerns, if any (a team admin's changes)
    before: str | None  # JSON
    after: str | None  # JSON
    id: int = 0
