"""What every stage shares: one identity per row, and the guard that keeps an identity from being lost.

A stage is a picklable callable on one pyarrow batch (Ray Data runs an instance as a task, or, for
the protect stage, a class in an actor pool). Its contract on errors is the same everywhere:

- a `TransientStorageError` (the store, not the identity) propagates, so Ray Data retries the task
  with backoff (`batch.io_retries`); stages make their writes idempotent for that;
- any other error fails *that identity* (transient: a rerun retries it) and the batch goes on —
  raising would make Ray Data drop the whole block after its retries, and its identities would end
  without a row.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from capray.batch.rows import table_of
from capray.config import CaprayConfig
from capray.io import manifest
from capray.io.storage import TransientStorageError

log = logging.getLogger(__name__)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Stage:
    """One row per identity in, one row per identity out (`output_schema`), every row guarded."""

    output_schema: ClassVar[pa.Schema]

    def __init__(self, cfg: CaprayConfig):
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of([self.guarded(row) for row in batch.to_pylist()], self.output_schema)

    def guarded(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.process(row)
        except TransientStorageError:
            raise
        except Exception as exc:
            log.exception("%s: unexpected error for identity %r", type(self).__name__, row.get("identity"))
            return self.failed(row, f"unexpected error: {short_error(exc)}")

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def failed(self, row: dict[str, Any], error: str) -> dict[str, Any]:
        """The identity's row once this stage failed it: transient, so a rerun retries it."""
        return dict(row, pixels=None, error=error, failure=manifest.FAILURE_TRANSIENT)
