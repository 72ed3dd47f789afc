"""The store's interface: everything the gateway keeps durably, shared by all its replicas.

Files (OpenAI Files API), batches and their lines (OpenAI Batch API, run by any replica under a
lease), and the inference log. Callers see only this ABC and the rows of `records.py`; which
database sits behind it is the business of `open_store`.

Conventions: an unknown id (or one owned by someone else) gives None, False or an empty result,
never an exception; `owner` is an API key id, None when auth is off, or ALL_OWNERS for the admin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable, Sequence
from typing import Any, Literal

from gateway.store.records import (
    AuditEntry,
    Batch,
    BatchError,
    BatchSpec,
    ClaimedLine,
    FileRecord,
    InferenceRecord,
    LineOutcome,
    NewLine,
    Owner,
    OwnerScope,
    Page,
    ReportRow,
    RequestFilter,
    SpendQuery,
    SpendRow,
    StoredResponse,
)


class Store(ABC):
    @abstractmethod
    async def close(self) -> None: ...

    # Files ----------------------------------------------------------------------------------

    @abstractmethod
    async def create_file(
        self,
        owner: Owner,
        purpose: str,
        filename: str,
        content: AsyncIterable[bytes] | bytes,
        *,
        max_bytes: int | None = None,
    ) -> FileRecord:
        """Store a file streamed from `content` in bounded memory (1 MiB parts, each written as it
        fills). Raises FileTooLargeError past `max_bytes`, leaving nothing behind."""

    @abstractmethod
    async def get_file(self, file_id: str, owner: OwnerScope) -> FileRecord | None: ...

    @abstractmethod
    async def list_files(
        self,
        owner: OwnerScope,
        *,
        purpose: str | None = None,
        limit: int = 10000,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> Page[FileRecord]:
        """As `GET /v1/files`: by creation, `after` a file id from the previous page."""

    @abstractmethod
    async def file_content(self, file_id: str, owner: OwnerScope) -> AsyncIterator[bytes] | None:
        """The content as an iterator of parts (one database read each), or None if not found."""

    @abstractmethod
    async def delete_file(self, file_id: str, owner: OwnerScope) -> bool: ...

    @abstractmethod
    async def purge_incomplete_uploads(self, older_than: float) -> int:
        """Remove uploads left half-written (by a crash) that started more than `older_than` s ago."""

    # Batches --------------------------------------------------------------------------------

    @abstractmethod
    async def create_batch(
        self,
        spec: BatchSpec,
        lines: Iterable[NewLine] | AsyncIterable[NewLine],
        *,
        status: Literal["validating", "in_progress"] = "in_progress",
    ) -> Batch:
        """Create the batch and all its lines (numbered from 1) in one transaction.
        Raises DuplicateCustomIdError (and creates nothing) when two lines share a custom_id.
        The transaction is open while `lines` is read: feed it from a stored file (as parsed
        from file_content), not at a client's pace, or SQLite's other writers wait meanwhile."""

    @abstractmethod
    async def create_failed_batch(self, spec: BatchSpec, errors: Sequence[BatchError]) -> Batch:
        """A batch whose input failed validation: status `failed`, the errors, no lines."""

    @abstractmethod
    async def get_batch(self, batch_id: str, owner: OwnerScope) -> Batch | None: ...

    @abstractmethod
    async def list_batches(self, owner: OwnerScope, *, limit: int = 20, after: str | None = None) -> Page[Batch]:
        """Newest first, as `GET /v1/batches`; `after` is a batch id from the previous page."""

    @abstractmethod
    async def set_batch_status(
        self,
        batch_id: str,
        *,
        expect: Collection[str],
        status: str,
        errors: Sequence[BatchError] | None = None,
    ) -> Batch | None:
        """Compare-and-set: move the batch to `status` (stamping its `*_at`) only if its status is
        one of `expect`; None when it is not (or the batch is unknown). A final status frees the
        lease. Use finalize_batch for completed/expired/cancelled: those need the result files."""

    @abstractmethod
    async def cancel_batch(self, batch_id: str, owner: OwnerScope) -> Batch | None:
        """validating/in_progress -> cancelling; no line is claimed from then on. Returns the batch
        as it is after the attempt (unchanged when it could not be cancelled), None if unknown."""

    @abstractmethod
    async def list_expired_batches(self, limit: int = 100) -> list[Batch]:
        """Batches past their expires_at that are still validating or in progress."""

    # Leases: one runner per batch at a time -------------------------------------------------

    @abstractmethod
    async def acquire_batch_lease(self, holder: str, ttl: float, *, batch_id: str | None = None) -> Batch | None:
        """Take the lease of one batch that needs a runner (validating, in_progress, finalizing or
        cancelling; earliest expiry first) whose lease is free or expired, or of `batch_id` only."""

    @abstractmethod
    async def renew_lease(self, batch_id: str, holder: str, ttl: float) -> bool:
        """Extend the lease; False when `holder` no longer has it (another replica took it over)."""

    @abstractmethod
    async def release_lease(self, batch_id: str, holder: str) -> bool: ...

    # Lines ----------------------------------------------------------------------------------

    @abstractmethod
    async def claim_lines(self, batch_id: str, holder: str, n: int, claim_ttl: float) -> list[ClaimedLine]:
        """Claim up to `n` lines (lowest line numbers first) that are pending or whose claim
        expired, atomically, only while the batch is in_progress. No two claims share a line."""

    @abstractmethod
    async def extend_claims(self, batch_id: str, claim_tokens: Collection[str], claim_ttl: float) -> int:
        """Push back the expiry of the lines still claimed under these claims (a runner whose
        lines take longer than a claim's TTL keeps them); returns how many lines it kept. A TTL
        of 0 hands them back: any runner may claim them at once (a runner that stops)."""

    @abstractmethod
    async def record_result(self, batch_id: str, line: int, claim_token: str, outcome: LineOutcome) -> bool:
        """Write a line's outcome if it is still held by this claim; True when written. Exactly
        one outcome is ever written per line; the batch's counts move with it. Raises ValueError
        when `outcome.body` is not JSON (the result files embed it as it is)."""

    @abstractmethod
    async def record_results(self, results: Sequence[tuple[ClaimedLine, LineOutcome]]) -> list[bool]:
        """record_result for many lines in one transaction (one commit instead of one per line);
        returns, per result in order, whether it was written."""

    @abstractmethod
    async def fail_pending(self, batch_id: str, code: str, message: str) -> int:
        """Fail every line not yet done or failed (pending, or claimed: a result that comes back
        for those later is refused) with this error; returns how many. For expiry and cancel."""

    @abstractmethod
    async def count_claimed(self, batch_id: str) -> int:
        """Lines claimed and not yet finished: what a cancelling runner waits for."""

    @abstractmethod
    async def finalize_batch(self, batch_id: str, *, expect: Collection[str], status: str) -> Batch | None:
        """Write the output file (done lines) and the error file (failed lines) in line order,
        owned by the batch's owner, and move the batch from one of `expect` to the final `status`,
        all in one transaction. None when the status did not match (someone else finalized it).
        Raises UnfinishedLinesError while lines are still pending or claimed."""

    # Inference log --------------------------------------------------------------------------

    @abstractmethod
    async def append_requests(self, rows: Sequence[InferenceRecord]) -> None: ...

    @abstractmethod
    async def query_requests(
        self, where: RequestFilter, *, limit: int = 100, after: int | None = None
    ) -> Page[InferenceRecord]:
        """Newest first; `after` is the `id` of the last row of the previous page."""

    @abstractmethod
    def report_rows(self, model: str, since: float, until: float) -> AsyncIterator[ReportRow]:
        """Every request of `model` in [since, until), read in pages."""

    @abstractmethod
    async def delete_requests_before(self, cutoff: float) -> int:
        """Retention: delete log rows older than `cutoff` (Unix seconds); returns how many."""

    # Spend rollups and the audit log --------------------------------------------------------

    @abstractmethod
    async def add_spend(self, rows: Sequence[SpendRow]) -> None:
        """Add these hours' figures to what is stored (each replica adds its own)."""

    @abstractmethod
    async def query_spend(self, q: SpendQuery) -> list[dict[str, Any]]:
        """Sums over [since, until) grouped as asked; spend in nano-units."""

    @abstractmethod
    async def append_audit(self, entry: AuditEntry) -> None: ...

    @abstractmethod
    async def query_audit(
        self,
        *,
        limit: int = 100,
        after: int | None = None,
        action: str | None = None,
        team: str | None = None,
        since: float | None = None,
    ) -> Page[AuditEntry]:
        """Newest first; `after` is the `id` of the last entry of the previous page."""

    # Stored responses (the Responses API's `store: true`) ------------------------------------

    @abstractmethod
    async def save_response(
        self, response_id: str, owner: Owner, response: dict[str, Any], input_items: list[dict[str, Any]]
    ) -> None: ...

    @abstractmethod
    async def get_response(self, response_id: str, owner: OwnerScope) -> StoredResponse | None: ...

    @abstractmethod
    async def delete_response(self, response_id: str, owner: OwnerScope) -> bool: ...

    @abstractmethod
    async def delete_responses_before(self, cutoff: float) -> int:
        """Retention: delete responses stored before `cutoff` (Unix seconds); returns how many."""
