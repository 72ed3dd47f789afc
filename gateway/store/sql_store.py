"""The store, implemented once in SQL over the Database seam (SQLite or PostgreSQL).

Each part lives in the module named for it (files, batches, lines, finalize, inference_log);
this class only puts them together behind the Store interface.
"""

from __future__ import annotations

from gateway.store.audit import AuditOps
from gateway.store.base import Store
from gateway.store.batches import BatchOps
from gateway.store.files import FileOps
from gateway.store.finalize import FinalizeOps
from gateway.store.inference_log import InferenceLogOps
from gateway.store.lines import LineOps
from gateway.store.responses import ResponseOps
from gateway.store.spend import SpendOps


class SqlStore(FileOps, BatchOps, LineOps, FinalizeOps, InferenceLogOps, SpendOps, AuditOps, ResponseOps, Store):
    async def close(self) -> None:
        await self.db.close()
