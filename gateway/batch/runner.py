"""The batch runner of one gateway process: takes batches that need a runner, runs them, and
keeps the store tidy.

Every process of every replica runs one (unless `batch.concurrency` is 0). Each looks for work
every `batch.poll_interval` (and at once when a batch is created here): it takes the lease of
a batch that needs a runner, whose lease is free or expired (its holder died), and runs it
(gateway/batch/job.py), up to `batch.max_batches` at once, all sharing `batch.concurrency`
lines in flight. A batch past its window whose lease is free is taken even beyond that limit,
so it expires on time. Uploads cut short by a crash are purged every `files.purge_interval`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from contextlib import suppress

from gateway.batch.job import BatchJob, JobContext
from gateway.batch.slots import Slots
from gateway.proxy.context import Current, Gateway
from gateway.store import Batch, Store

log = logging.getLogger(__name__)


class BatchRunner:
    def __init__(self, current: Current) -> None:
        self.current = current  # the newest configuration: each line runs on the one it starts with
        self.settings = current.gw.settings.batch
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.jobs: dict[str, BatchJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._purged = 0.0
        self._ctx: JobContext | None = None

    @property
    def gw(self) -> Gateway:
        return self.current.gw

    def start(self, store: Store) -> None:
        self._ctx = JobContext(self.current, store, self.settings, self.holder, Slots(self.settings.concurrency))
        self._loop = asyncio.create_task(self._run(store), name="batch-runner")

    async def stop(self) -> None:
        """Stops taking work and ends the jobs: lines in flight are aborted, their claims and the
        leases handed back, so another process takes the batches over at once."""
        tasks = [t for t in (self._loop, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """A batch was created here: look for work now rather than at the next poll."""
        self._wake.set()

    def cancelled(self, batch_id: str) -> None:
        """A batch was cancelled here: if this process runs it, no new line starts from now."""
        job = self.jobs.get(batch_id)
        if job is not None:
            job.halt()

    async def _run(self, store: Store) -> None:
        while True:
            try:
                if self.settings.concurrency > 0:
                    await self._take_work(store)
                await self._purge(store)
            except Exception as exc:  # the store is down: try again at the next poll
                log.warning("batch runner: %r", exc)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)
            self._wake.clear()

    async def _take_work(self, store: Store) -> None:
        s = self.settings
        now = time.time()
        for batch in await store.list_expired_batches():
            free = batch.lease_expires is None or batch.lease_expires < now
            if free and batch.id not in self.jobs:
                taken = await store.acquire_batch_lease(self.holder, s.lease_ttl, batch_id=batch.id)
                if taken is not None:
                    self._start(taken)
        while len(self.jobs) < s.max_batches:
            taken = await store.acquire_batch_lease(self.holder, s.lease_ttl)
            if taken is None or taken.id in self.jobs:
                break  # nothing to do (or our own batch, whose renewal is late)
            self._start(taken)

    def _start(self, batch: Batch) -> None:
        assert self._ctx is not None
        job = BatchJob(self._ctx, batch)
        self.jobs[batch.id] = job
        log.info("batch %s: running it here (%s)", batch.id, self.holder)
        task = asyncio.create_task(self._run_job(job), name=f"batch-{batch.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job: BatchJob) -> None:
        observe = self.gw.observe
        try:
            if observe is None:
                await job.run()
            else:  # one span for the batch's run here; its lines' spans link to it
                with observe.batch(job.id, {"gateway.batch.endpoint": job.batch.endpoint}):
                    await job.run()
        except Exception:
            log.exception("batch %s: the job failed; it is taken up again at the next poll", job.id)
        finally:
            self.jobs.pop(job.id, None)
            self._wake.set()  # room for another batch

    async def _purge(self, store: Store) -> None:
        files = self.gw.settings.files
        if time.monotonic() - self._purged < files.purge_interval and self._purged:
            return
        self._purged = time.monotonic()
        purged = await store.purge_incomplete_uploads(files.purge_after)
        if purged:
            log.info("purged %d uploads left incomplete for more than %.0f s", purged, files.purge_after)
