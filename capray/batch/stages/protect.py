"""Stage 4, protect (GPU actor pool): one `capray.Protector` per actor, one call per identity group.

- Attempts are counted in the job's ledger (`capray.batch.attempts`), across actor deaths: a group
  that kills its process is retried on the restarted actor at most `batch.group_retries` times,
  then recorded `failed`.
- A group running past `batch.group_timeout_s` cannot be stopped from inside (a hung kernel or
  lock): the watchdog records the verdict in the ledger and ends the process; Ray restarts the
  actor and the retried task records the group `failed` with that reason.
- After `batch.actor_error_limit` consecutive engine errors, or one that leaves the device unusable
  (a sticky CUDA error), the actor ends itself so that Ray replaces it with a fresh process
  instead of failing every later group in milliseconds; the group is retried there.

Every failure here is transient (engine or infrastructure), except the engine's own verdict on a
group (`ValueError`), which no retry can change. A non-finite value (`NonFiniteError`) is not retried
within the run either (same config and seed, same NaN) but stays transient: the next run retries it.
Nothing here knows about storage.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import threading
from typing import Any

import numpy as np

from capray.attack.guard import NonFiniteError
from capray.batch.attempts import DEFERRED
from capray.batch.rows import GROUP_SCHEMA
from capray.batch.stages.base import Stage, short_error
from capray.config import CaprayConfig
from capray.io import manifest

log = logging.getLogger(__name__)

# CUDA errors that leave the context unusable: every later call in this process would fail too.
_STICKY_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|"
                                  r"illegal memory access|NCCL error", re.IGNORECASE)


class ProtectStage(Stage):
    """Ray Data runs this class in an actor pool: `__init__` once per actor (the models), then batches.

    The config, the attempt ledger and the scoring pool ride on a subclass the processor builds
    (`configured`), not in constructor args: Ray keeps constructor args in the object store, and a
    restarted actor (max_restarts=-1) would need them there (ray#53727)."""

    output_schema = GROUP_SCHEMA
    CONFIG_JSON: str | None = None  # set on the subclass the processor builds
    LEDGER_NAME: str | None = None  # the job's attempt ledger (None: count within this actor)
    SCORING_POOL: str | None = None  # the job's scoring-actor pool (None: sharding off)

    @classmethod
    def configured(cls, cfg: CaprayConfig, ledger_name: str | None, pool_name: str | None) -> type:
        return type(cls.__name__, (cls,), {"CONFIG_JSON": cfg.model_dump_json(), "LEDGER_NAME": ledger_name,
                                           "SCORING_POOL": pool_name})

    def __init__(self, config_json: str | None = None):
        from capray.batch.attempts import LedgerClient
        from capray.distributed.pool import PoolClient

        super().__init__(CaprayConfig.model_validate_json(config_json or self.CONFIG_JSON))
        self.protector = self.load_protector()
        self.ledger = LedgerClient(self.LEDGER_NAME)
        self.scoring_pool = PoolClient.for_actor(self.SCORING_POOL) if self.SCORING_POOL else None
        self.consecutive_errors = 0

    def load_protector(self):
        """The models, loaded once per actor (tests override this and `run_engine` with a stand-in)."""
        from capray.protector import Protector

        return Protector.from_config(self.cfg)

    def run_engine(self, rgbs: list[np.ndarray], identity: str, fixed: list[np.ndarray] = ()):
        """Protect `rgbs`, with `fixed` (published protected photos, append mode) in CAP's group."""
        from capray.distributed.candidates import evaluator_factory_for

        result = self.protector(rgbs, identity, fixed=list(fixed),
                                evaluator_factory=evaluator_factory_for(self.cfg.sharding, self.scoring_pool))
        return result.arrays, result.record

    def end_process(self, reason: str) -> None:
        """Die so that Ray Data restarts this actor (a fresh process) and retries its group elsewhere."""
        log.error("replacing this protect actor (pid %d): %s", os.getpid(), reason)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(70)

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("error") or row.get("deleted") or row.get("deferred"):
            return row
        b, identity = self.cfg.batch, row["identity"]
        photos = [np.frombuffer(p, dtype=np.uint8).reshape(h, w, 3).copy()  # writable: torch wants to own it
                  for p, (h, w) in zip(row["pixels"], row["shapes"])]
        held = row.get("fixed_outputs") or [None] * len(photos)
        rgbs = [a for a, h in zip(photos, held) if h is None]  # to protect now
        fixed = [a for a, h in zip(photos, held) if h is not None]  # published: in the group, never changed
        if not rgbs:  # only removed photos: nothing to protect, the write stage removes their outputs
            return dict(row, pixels=[])

        def done(result: dict[str, Any]) -> dict[str, Any]:
            # never reached when the process ends mid-group: the entry then waits for Ray's retry
            self.ledger.finish(identity)
            return result

        def failed(error: str, attempts: int, failure: str = manifest.FAILURE_TRANSIENT) -> dict[str, Any]:
            return done(dict(row, pixels=None, error=error, attempts=attempts, failure=failure))

        while True:
            attempt, last_error, verdict = self.ledger.begin(identity)
            if verdict == DEFERRED:  # the run is stopping: not started, given back to the next run
                return dict(row, pixels=None, deferred=True)
            if verdict:
                return failed(verdict, attempt - 1)
            if attempt > 1 + b.group_retries:
                why = last_error or ("the process running it died during each attempt "
                                     "(a crash, out of memory, or killed)")
                return failed(f"protection failed after {attempt - 1} attempts: {why}", attempt - 1)
            try:
                with _watchdog(b.group_timeout_s, lambda n=attempt: self._timed_out(identity, n)):
                    protected, record = self.run_engine(rgbs, identity, fixed)
            except NonFiniteError as exc:  # deterministic: another attempt meets the same NaN (the next run retries)
                return failed(str(exc), attempt, exc.failure_class)
            except ValueError as exc:  # the engine's verdict on the group itself: retrying cannot help
                return failed(f"engine refused the group: {exc}", attempt, manifest.FAILURE_INPUT)
            except Exception as exc:  # transient: a device or runtime error
                self.consecutive_errors += 1
                error = short_error(exc)
                self.ledger.record(identity, error=error)
                if _STICKY_DEVICE_ERROR.search(str(exc)) or self.consecutive_errors >= b.actor_error_limit:
                    self.end_process(f"{self.consecutive_errors} consecutive engine error(s), last: {error}")
                continue
            self.consecutive_errors = 0
            # pixels of the protected photos only, in input order (the write stage pairs them up again)
            return done(dict(row, pixels=[a.tobytes() for a in protected], record=record.model_dump_json(),
                             attempts=attempt))

    def _timed_out(self, identity: str, attempt: int) -> None:
        limit = self.cfg.batch.group_timeout_s
        self.ledger.record(identity, verdict=f"timed out: attempt {attempt} ran over batch.group_timeout_s="
                                             f"{limit:g}s and was stopped (its actor was replaced)")
        self.end_process(f"group {identity!r} ran over {limit:g}s")


@contextlib.contextmanager
def _watchdog(timeout_s: float, on_timeout):
    """Call `on_timeout` (which ends the process) if the block runs past `timeout_s` (0: no limit).

    The timer thread needs the GIL; a hang that holds it is caught by faulthandler's C-level timer a
    minute later, which dumps every thread's stack to the worker log and exits the process.
    """
    if not timeout_s:
        yield
        return
    timer = threading.Timer(timeout_s, on_timeout)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(timeout_s + 60, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
