"""One batch, run by the gateway process that holds its lease: claim -> run -> record -> finalize.

Lines are claimed from the store a few at a time (`batch.claim_size`) and started as slots of
the process's `batch.concurrency` free up; results are recorded in groups (one commit for many
lines). While the job runs, a keeper renews the lease, extends the claims of lines in flight (so
a slow line is never taken over while it runs) and watches the batch:

- every line done or failed -> `finalizing` -> `completed`, with the output and error files;
- cancelled -> no new line starts; lines in flight finish (at most `batch.cancel_grace`, then
  they are aborted); the rest fail `batch_cancelled`; `cancelled`;
- past `expires_at` -> lines in flight are aborted; the rest fail `batch_expired`; `expired`;
- the lease lost (this process stalled and another took over) -> no new line starts; lines in
  flight finish and are recorded under their claims; the job ends.

Whatever dies on the way, the store keeps every line to exactly one outcome: a line whose runner
died is claimed again once its claim expires, and a late result of an old claim is refused. A
result carries what its run was charged, written with it (gateway/batch/dispatch.py says how a
line that ran twice is charged once); a line aborted by a cancel or an expiry is recorded here
with the cancel's or expiry's error and what it was charged until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from contextlib import suppress
from dataclasses import dataclass

from gateway.batch.dispatch import RERUN_MARGIN, Charge, LineDispatcher
from gateway.batch.slots import Slots
from gateway.core.request import ENDPOINTS
from gateway.proxy.context import Current, Gateway
from gateway.settings import BatchSettings
from gateway.store import ALL_OWNERS, FINAL_STATUSES, Batch, ClaimedLine, LineOutcome, Store, UnfinishedLinesError

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.05  # results that arrive within this long share one commit
RETRY_DELAY = 1.0  # after a failed store call
CANCELLED = "The batch was cancelled before this request ran."
EXPIRED = "The batch's completion window ended before this request ran."
# The error of a line a cancel or an expiry ends (the same whether it was pending or in flight).
ENDED = {"cancelled": ("batch_cancelled", CANCELLED), "expired": ("batch_expired", EXPIRED)}


@dataclass(frozen=True)
class JobContext:
    """What the jobs of one runner share."""

    current: Current  # the newest configuration (gateway/proxy/context.py)
    store: Store
    settings: BatchSettings
    holder: str
    slots: Slots

    @property
    def gw(self) -> Gateway:
        return self.current.gw


class BatchJob:
    def __init__(self, ctx: JobContext, batch: Batch) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.id = batch.id
        self.batch = batch
        s = ctx.settings
        keep = round(s.claim_ttl + s.lease_ttl) + RERUN_MARGIN
        self.dispatcher = LineDispatcher(ctx.current, ENDPOINTS[batch.endpoint], batch.id, batch.owner, keep)
        self.halted = asyncio.Event()  # no new line starts: cancelled, expired, lease lost, stopping
        # Why lines in flight are aborted, when it ends them (a cancel, an expiry): their error.
        # None: an abort hands them back (this process stops), to run again elsewhere.
        self.ending: tuple[str, str] | None = None
        self.lost = False
        self.running: set[asyncio.Task[None]] = set()
        self.results: list[tuple[ClaimedLine, LineOutcome]] = []
        self.held: Counter[str] = Counter()  # claim token -> lines claimed and not yet recorded
        self._results_ready = asyncio.Event()
        self._closing = False

    def halt(self) -> None:
        if not self.halted.is_set():
            self.halted.set()
            self.ctx.slots.wake_all()

    async def run(self) -> None:
        keeper = asyncio.create_task(self._keep(), name=f"batch-keeper-{self.id}")
        try:
            await self._drive()
        finally:
            self.halt()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self._give_back()

    async def _drive(self) -> None:
        store = self.store
        while not self.lost:
            batch = await store.get_batch(self.id, ALL_OWNERS)
            if batch is None or batch.status in FINAL_STATUSES:
                return
            self.batch = batch
            if batch.status == "validating":
                await self._transition(["validating"], "in_progress")
            elif batch.status == "in_progress":
                if time.time() >= batch.expires_at:
                    await self._expire()
                    continue
                if self.halted.is_set():  # halted while the store still says in_progress: look again soon
                    await asyncio.sleep(self.ctx.settings.poll_interval)
                    continue
                await self._run_lines()
                if self.lost or self.halted.is_set():
                    continue  # the status says what comes next
                if await store.count_claimed(self.id) == 0:
                    # No line is pending (the last claim found none) and none is claimed: done.
                    if await self._transition(["in_progress"], "finalizing"):
                        await self._finalize()
                else:
                    await asyncio.sleep(self.ctx.settings.poll_interval)  # another runner's claims
            elif batch.status == "cancelling":
                await self._cancel(batch)
            elif batch.status == "finalizing":
                await self._finalize()

    async def _run_lines(self) -> None:
        self._closing = False
        flusher = asyncio.create_task(self._flush_loop(), name=f"batch-flush-{self.id}")
        try:
            await self._feed()
            await self._wait_lines()
        finally:
            self._closing = True
            self._results_ready.set()
            await asyncio.gather(flusher, return_exceptions=True)

    async def _feed(self) -> None:
        buffer: deque[ClaimedLine] = deque()
        size = self.ctx.settings.claim_size
        exhausted = False
        while not self.halted.is_set():
            if not exhausted and len(buffer) <= size // 2:
                lines = await self._claim(size - len(buffer))
                if lines is None:
                    continue
                exhausted = not lines
                buffer.extend(lines)
            if not buffer or not await self.ctx.slots.take(self.halted):
                return
            self._start(buffer.popleft())
        # Lines left in `buffer` were claimed and never started: their claims are given back
        # when the job ends (_give_back), or failed by a cancel or expiry before that.

    async def _claim(self, n: int) -> list[ClaimedLine] | None:
        s = self.ctx.settings
        try:
            lines = await self.store.claim_lines(self.id, self.ctx.holder, n, s.claim_ttl)
        except Exception as exc:  # the store is down or busy: try again shortly
            log.warning("batch %s: claiming lines failed: %r", self.id, exc)
            with suppress(TimeoutError):
                await asyncio.wait_for(self.halted.wait(), RETRY_DELAY)
            return None
        for line in lines:
            self.held[line.claim_token] += 1
        return lines

    def _start(self, line: ClaimedLine) -> None:
        self.ctx.gw.metrics.batch_lines_in_flight.inc()
        task = asyncio.create_task(self._run_line(line))
        self.running.add(task)
        # A callback, not a `finally`: a task cancelled before its first step never enters its body.
        task.add_done_callback(self._line_done)

    def _line_done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.ctx.gw.metrics.batch_lines_in_flight.dec()
        self.ctx.slots.give()

    async def _run_line(self, line: ClaimedLine) -> None:
        charge = Charge()
        try:
            outcome = await self.dispatcher.run(line, charge)
        except asyncio.CancelledError:
            if self.ending is None:
                raise  # handed back: its next run's charge replaces this one's
            outcome = LineOutcome.failure(*self.ending, spend=charge.spend)
        except Exception:
            log.exception("batch %s line %d failed in the gateway", self.id, line.line)
            message = "The gateway failed while running this request."
            outcome = LineOutcome.failure("internal_error", message, spend=charge.spend)
        self.results.append((line, outcome))
        self._results_ready.set()

    async def _wait_lines(self) -> None:
        while self.running:
            await asyncio.wait(set(self.running))

    async def _abort_lines(self) -> None:
        for task in self.running:
            task.cancel()
        await self._wait_lines()

    async def _flush_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            if not self._closing:
                await asyncio.sleep(FLUSH_DELAY)
            await self._flush()
            if self._closing and not self.results:
                return

    async def _flush(self) -> None:
        """Records every result collected so far, in one transaction; retries while the store fails."""
        while self.results:
            group, self.results = self.results, []
            try:
                written = await self.store.record_results(group)
            except Exception as exc:
                log.warning("batch %s: recording %d results failed: %r", self.id, len(group), exc)
                self.results = group + self.results
                await asyncio.sleep(RETRY_DELAY)
                continue
            lines = self.ctx.gw.metrics.batch_lines_by
            for (line, outcome), ok in zip(group, written, strict=True):
                self._release(line.claim_token)
                lines[_label(outcome) if ok else "discarded"].inc()

    def _release(self, token: str) -> None:
        self.held[token] -= 1
        if self.held[token] <= 0:
            del self.held[token]

    async def _transition(self, expect: list[str], status: str) -> Batch | None:
        batch = await self.store.set_batch_status(self.id, expect=expect, status=status)
        if batch is not None:
            self.ctx.gw.metrics.batches_by[status].inc()
        return batch

    async def _finalize(self) -> None:
        try:
            batch = await self.store.finalize_batch(self.id, expect=["finalizing"], status="completed")
        except UnfinishedLinesError:
            # Only a runner that lost its lease and kept claiming can leave lines behind: run them.
            await self._transition(["finalizing"], "in_progress")
            return
        if batch is not None:
            self.ctx.gw.metrics.batches_by["completed"].inc()

    async def _expire(self) -> None:
        self.halt()
        self.ending = ENDED["expired"]
        await self._abort_lines()
        await self._flush()
        failed = await self.store.fail_pending(self.id, *ENDED["expired"])
        batch = await self.store.finalize_batch(self.id, expect=["in_progress"], status="expired")
        if batch is not None:
            self.ctx.gw.metrics.batches_by["expired"].inc()
            self.ctx.gw.metrics.batch_lines_by["expired"].inc(failed)

    async def _cancel(self, batch: Batch) -> None:
        self.halt()
        grace_end = (batch.cancelling_at or time.time()) + self.ctx.settings.cancel_grace
        await self._wait_lines()  # the keeper aborts what still runs at grace_end
        await self._flush()
        # Lines other runners have in flight may still finish within the grace period.
        while time.time() < grace_end:
            if await self.store.count_claimed(self.id) <= sum(self.held.values()):
                break
            await asyncio.sleep(self.ctx.settings.poll_interval)
        failed = await self.store.fail_pending(self.id, *ENDED["cancelled"])
        done = await self.store.finalize_batch(self.id, expect=["cancelling"], status="cancelled")
        if done is not None:
            self.ctx.gw.metrics.batches_by["cancelled"].inc()
            self.ctx.gw.metrics.batch_lines_by["cancelled"].inc(failed)

    async def _keep(self) -> None:
        """Renews the lease, extends the claims of lines in flight, and watches the batch."""
        s, store = self.ctx.settings, self.store
        renewed = extended = time.monotonic()
        while True:
            await asyncio.sleep(min(s.poll_interval, s.lease_ttl / 3))
            try:
                if not self.lost and time.monotonic() - renewed >= s.lease_ttl / 3:
                    if await store.renew_lease(self.id, self.ctx.holder, s.lease_ttl):
                        renewed = time.monotonic()
                    else:
                        self._lose("another process took the batch over")
                if self.held and time.monotonic() - extended >= s.claim_ttl / 3:
                    await store.extend_claims(self.id, list(self.held), s.claim_ttl)
                    extended = time.monotonic()
                batch = await store.get_batch(self.id, ALL_OWNERS)
                if batch is not None:
                    self._watch(batch)
            except Exception as exc:
                log.warning("batch %s: keeping the lease failed: %r", self.id, exc)
                if time.monotonic() - renewed > s.lease_ttl:
                    self._lose("the lease could not be renewed in time")

    def _lose(self, why: str) -> None:
        if not self.lost:
            log.warning("batch %s: lease lost (%s); finishing the lines in flight", self.id, why)
            self.lost = True
            self.halt()

    def _watch(self, batch: Batch) -> None:
        now = time.time()
        if batch.status == "cancelling":
            self.halt()
            if now >= (batch.cancelling_at or now) + self.ctx.settings.cancel_grace:
                self.ending = ENDED["cancelled"]
                self._abort_running()
        elif (batch.status == "in_progress" and now >= batch.expires_at) or batch.status in FINAL_STATUSES:
            self.halt()
            if batch.status == "in_progress":
                self.ending = ENDED["expired"]
            self._abort_running()

    def _abort_running(self) -> None:
        for task in self.running:
            task.cancel()

    async def _give_back(self) -> None:
        """At the end: record what finished, hand back the claims of lines never run (another
        runner may take them at once) and the lease."""
        try:
            await self._abort_lines()
            async with asyncio.timeout(10):
                await self._flush()
                if self.held:
                    await self.store.extend_claims(self.id, list(self.held), 0)
                await self.store.release_lease(self.id, self.ctx.holder)
        except Exception as exc:
            log.warning("batch %s: handing back claims and lease failed: %r", self.id, exc)


def _label(outcome: LineOutcome) -> str:
    """A written result's outcome in gateway_batch_lines_total."""
    for label, (code, _) in ENDED.items():
        if outcome.error_code == code:
            return label
    return "failed" if outcome.failed else "completed"
