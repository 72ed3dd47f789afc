"""A FIFO scheduler for transformers' continuous batching that cannot wedge after cancellations.

When the paged KV cache runs full, transformers' offloading manager moves some requests out of
the batch and sets `scheduler.block_new_requests`, so that waiting requests stay out until room
is made. Only a request that *finishes* clears that flag again. When every active request is
cancelled instead (clients that all hang up, the mass abort of issue 20), nothing ever finishes:
the flag stays set, new requests sit in the waiting list forever, and the loop idles while
looking healthy. Cancellation frees cache blocks just as finishing does, so here it clears the
flag too, and a scheduler with nothing active never holds its waiting requests back.
"""

from __future__ import annotations

from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler

SCHEDULER_NAME = "fifo-unwedged"


class UnwedgedFifoScheduler(FIFOScheduler):
    def clear_cancelled_requests(self) -> list[RequestState]:
        cancelled: list[RequestState] = super().clear_cancelled_requests()
        if cancelled:
            self.block_new_requests = False  # their blocks are free now, as if they had finished
        return cancelled

    def schedule_batch(
        self, token_budget: int, cache_budget: int
    ) -> tuple[list[FutureRequestState] | None, bool, int, int]:
        if self.block_new_requests and not self.active_requests:
            self.block_new_requests = False  # nothing active can ever finish to lift the block
        return super().schedule_batch(token_budget, cache_budget)


def register() -> str:
    """Makes the scheduler selectable by name in a ContinuousBatchingConfig; returns that name."""
    SCHEDULER_MAPPING[SCHEDULER_NAME] = UnwedgedFifoScheduler
    return SCHEDULER_NAME
