"""The stages of the job, each a plain callable on one pyarrow batch (one row = one identity).

- `decode_batch` (CPU tasks): read every photo of the identity through fsspec and decode it safely;
  a group with any unusable photo fails as a whole, with every bad file and its reason in the error
  (CAP optimises the group together, and publishing part of it silently would lose photos).
- `ProtectActor` (GPU actor pool): loads the models once, then calls the engine per group. It is a
  thin shell around `protect_arrays`; nothing here knows about storage.
- `write_batch` (CPU tasks): encode PNGs, write them atomically, remove earlier outputs whose source
  is gone or changed, and pass on the identity's (not yet committed) manifest row.
- `commit_batch` (CPU tasks, `batch.records_per_commit` identities per call): the commit. One Parquet
  file with all their rows, then each identity's state for the next run's done-check; returns small
  summary rows for progress and metrics.

Every stage emits tables with an explicit schema, so blocks of failed and ok groups concatenate.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import posixpath
import re
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from capray.attack.api import ProtectionRecord
from capray.io import manifest
from capray.io.allowlist import uri_problem
from capray.io.images import BadImage, decode_image, encode_png
from capray.io.storage import (
    TransientStorageError,
    get_fs,
    inside,
    is_transient,
    join,
    read_bytes,
    remove_stale_temps,
    write_bytes_atomic,
)

PLAN_SCHEMA = pa.schema([
    ("identity", pa.string()), ("safe", pa.string()), ("uris", pa.list_(pa.string())),
    ("stems", pa.list_(pa.string())), ("problem", pa.string()),
    ("failure", pa.string()),  # the failure class of `problem`/`error`: manifest.FAILURE_INPUT or _TRANSIENT
    ("stamps", pa.list_(pa.string())), ("fingerprint", pa.string()),  # the input as listed (see discover.Photo)
    ("prev_stamps", pa.list_(pa.string())), ("prev_outputs", pa.list_(pa.string())),  # what is published now
    ("prev_known", pa.bool_()),  # False: the committed state could not be read; leave it as it is
])
GROUP_SCHEMA = pa.schema(list(PLAN_SCHEMA) + [
    ("error", pa.string()), ("started_at", pa.float64()),
    ("pixels", pa.list_(pa.large_binary())), ("shapes", pa.list_(pa.list_(pa.int32()))),
    ("alphas", pa.list_(pa.large_binary())), ("photo_notes", pa.list_(pa.string())),
    ("record", pa.string()), ("attempts", pa.int32()),
])
WRITTEN_SCHEMA = pa.schema([
    ("safe", pa.string()), ("row", pa.string()), ("published", pa.list_(pa.list_(pa.string()))),
    ("prev_known", pa.bool_()),
])
SUMMARY_SCHEMA = pa.schema([
    *(manifest.SCHEMA.field(name) for name in
      ("identity", "status", "failure_class", "error", "seconds", "engine_seconds", "pgd_steps")),
    ("lambdas", manifest.SCHEMA.field("lambda_schedule").type),  # the chosen λ only (no nulls before k̂)
    ("committed", pa.bool_()),  # False: the row or state could not be committed; the driver names it
])


def table_of(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def config_from(config_json: str):
    from capray.config import CaprayConfig

    return CaprayConfig.model_validate_json(config_json)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# An unreadable photo is the input's fault when the file is gone or not a file; other OSErrors
# (timeouts, throttling, connection resets) are the infrastructure's, and the next run retries them.
# So is a refused read (PermissionError): an IAM policy or KMS key misconfigured for the job refuses
# every photo alike, and once it is fixed a rerun must retry them, not skip them as failed for good.
INPUT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def guarded(stage, row: dict[str, Any], *args) -> dict[str, Any]:
    """Run one identity through a stage; an unexpected error fails that identity (transient) instead of
    raising, which would make Ray Data drop the whole block after its retries and leave the identity
    without a row. Transient storage errors still raise: Ray Data retries the task for them."""
    try:
        return stage(row, *args)
    except TransientStorageError:
        raise
    except Exception as exc:
        traceback.print_exc()
        return dict(row, pixels=None, error=f"unexpected error: {short_error(exc)}",
                    failure=manifest.FAILURE_TRANSIENT)


# -- stage 1: decode ----------------------------------------------------------------------------------

def decode_group(row: dict[str, Any], cfg, allowed: list[str] | None = None) -> dict[str, Any]:
    """`allowed`: prefixes the photo URIs must lie under (`capray.io.allowlist`); None: no check."""
    out = dict(row, started_at=time.time())
    if row.get("problem"):
        return dict(out, error=row["problem"], failure=row.get("failure") or manifest.FAILURE_INPUT)
    b = cfg.batch
    pixels, shapes, alphas, notes, bad, transient = [], [], [], [], [], False
    for uri in row["uris"]:
        name = posixpath.basename(uri) or uri
        try:
            if not uri:
                raise BadImage("empty URI in the input manifest")
            refused = uri_problem(uri, allowed) if allowed is not None else None
            if refused:
                raise BadImage(refused)
            fs, path = get_fs(uri, b.storage_options)
            decoded = decode_image(read_bytes(fs, path, b.max_file_bytes), max_pixels=b.max_image_pixels,
                                   min_side=b.min_image_side)
        except (BadImage, ValueError, OSError) as exc:  # OSError: missing file, permission, network
            if is_transient(exc):  # the store, not the photo: Ray Data retries the task
                raise TransientStorageError(f"reading {uri}: {short_error(exc)}") from exc
            bad.append(f"{name}: {exc if isinstance(exc, BadImage) else short_error(exc)}")
            transient |= isinstance(exc, OSError) and not isinstance(exc, INPUT_OS_ERRORS)
            continue
        pixels.append(decoded.rgb.tobytes())
        shapes.append(list(decoded.rgb.shape[:2]))
        alphas.append(decoded.alpha.tobytes() if decoded.alpha is not None else None)
        notes.extend(f"{name}: {n}" for n in decoded.notes)
    if bad:
        return dict(out, error=f"{len(bad)} of {len(row['uris'])} photos unusable; nothing written for this "
                               f"identity: " + "; ".join(bad),
                    failure=manifest.FAILURE_TRANSIENT if transient else manifest.FAILURE_INPUT)
    return dict(out, pixels=pixels, shapes=shapes, alphas=alphas, photo_notes=notes)


def decode_batch(batch: pa.Table, config_json: str, allowed: list[str] | None = None) -> pa.Table:
    cfg = config_from(config_json)
    return table_of([guarded(decode_group, row, cfg, allowed) for row in batch.to_pylist()], GROUP_SCHEMA)


# -- stage 2: protect (actor) ---------------------------------------------------------------------------

class ProtectActor:
    """Models loaded once per actor; one engine call per group, with bounded attempts and a watchdog.

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
    group (`ValueError`), which no retry can change.
    """

    CONFIG_JSON: str | None = None  # set on the subclass the pipeline builds
    LEDGER_NAME: str | None = None  # the job's attempt ledger (None: count within this actor)
    SCORING_POOL: str | None = None  # the job's scoring-actor pool (None: sharding off)

    def __init__(self, config_json: str | None = None):
        from capray.batch.attempts import LedgerClient
        from capray.distributed.pool import PoolClient

        self.cfg = config_from(config_json or self.CONFIG_JSON)
        self.models = self.load_models()
        self.ledger = LedgerClient(self.LEDGER_NAME)
        self.scoring_pool = PoolClient.for_actor(self.SCORING_POOL) if self.SCORING_POOL else None
        self.consecutive_errors = 0

    def load_models(self):
        from capray import load_models

        return load_models(self.cfg.model)

    def run_engine(self, rgbs: list[np.ndarray], identity: str):
        from capray.attack.api import protect_arrays
        from capray.distributed.candidates import evaluator_factory_for

        return protect_arrays(rgbs, self.cfg, identity, self.models,
                              evaluator_factory=evaluator_factory_for(self.cfg.sharding, self.scoring_pool))

    def end_process(self, reason: str) -> None:
        """Die so that Ray Data restarts this actor (a fresh process) and retries its group elsewhere."""
        print(f"capray: replacing this protect actor (pid {os.getpid()}): {reason}", file=sys.stderr, flush=True)
        os._exit(70)

    def protect(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("error"):
            return row
        b, identity = self.cfg.batch, row["identity"]
        rgbs = [np.frombuffer(p, dtype=np.uint8).reshape(h, w, 3).copy()  # writable: torch wants to own it
                for p, (h, w) in zip(row["pixels"], row["shapes"])]

        def done(result: dict[str, Any]) -> dict[str, Any]:
            # never reached when the process ends mid-group: the entry then waits for Ray's retry
            self.ledger.finish(identity)
            return result

        def failed(error: str, attempts: int, failure: str = manifest.FAILURE_TRANSIENT) -> dict[str, Any]:
            return done(dict(row, pixels=None, error=error, attempts=attempts, failure=failure))

        while True:
            attempt, last_error, verdict = self.ledger.begin(identity)
            if verdict:
                return failed(verdict, attempt - 1)
            if attempt > 1 + b.group_retries:
                why = last_error or ("the process running it died during each attempt "
                                     "(a crash, out of memory, or killed)")
                return failed(f"protection failed after {attempt - 1} attempts: {why}", attempt - 1)
            try:
                with _watchdog(b.group_timeout_s, lambda: self._timed_out(identity, attempt)):
                    protected, record = self.run_engine(rgbs, identity)
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
            return done(dict(row, pixels=[a.tobytes() for a in protected], record=record.model_dump_json(),
                             attempts=attempt))

    def _timed_out(self, identity: str, attempt: int) -> None:
        limit = self.cfg.batch.group_timeout_s
        self.ledger.record(identity, verdict=f"timed out: attempt {attempt} ran over batch.group_timeout_s="
                                             f"{limit:g}s and was stopped (its actor was replaced)")
        self.end_process(f"group {identity!r} ran over {limit:g}s")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of([guarded(self.protect, row) for row in batch.to_pylist()], GROUP_SCHEMA)


# CUDA errors that leave the context unusable: every later call in this process would fail too.
_STICKY_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|"
                                  r"illegal memory access|NCCL error", re.IGNORECASE)


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


# -- stage 3: encode + write (per identity), then commit (many identities per record file) ----------------

def remove_outputs(uris: list[str], output: str, storage_options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Delete earlier outputs whose source is gone or changed; returns (removed, still there).

    The URIs come from the saved state, which names OUTPUT as it was when they were written: after
    OUTPUT is copied or moved they point at the old place. Only files inside this OUTPUT are
    deleted; any other is left alone, said on stderr and no longer counted as published here."""
    removed, kept = [], []
    for uri in uris:
        if not inside(uri, output):
            print(f"capray: not removing {uri}: the saved state names it but it is outside OUTPUT {output}",
                  file=sys.stderr)
            continue
        fs, path = get_fs(uri, storage_options)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass  # already gone (e.g. removed by an attempt that crashed before its commit)
        except OSError:
            traceback.print_exc()
            kept.append(uri)  # still published: the state keeps it, so the next run tries again
            continue
        removed.append(uri)
    return removed, kept


def _published_after(row: dict[str, Any], uris: list[str], ok: bool) -> list[tuple[str, str]]:
    """(input stamp, output URI) pairs that stay published once this attempt is committed."""
    previous = list(zip(row.get("prev_stamps") or [], row.get("prev_outputs") or []))
    if ok:
        return list(zip(row["stamps"], uris))
    if row.get("stamps") is None:  # the input could not be listed: nothing is known to be gone
        return previous
    current = set(row["stamps"])
    return [(stamp, uri) for stamp, uri in previous if stamp in current]  # unchanged sources keep theirs


def write_group(row: dict[str, Any], cfg, output: str) -> dict[str, Any]:
    """Write the identity's PNGs and remove outputs whose source is gone; returns its uncommitted row."""
    so = cfg.batch.storage_options
    # a group the engine never saw gets the run's fields and notes (the tiny model's label) all the same
    record = (ProtectionRecord.model_validate_json(row["record"]) if row.get("record")
              else ProtectionRecord.unprotected(cfg, row["identity"]))
    error, failure, uris = row.get("error"), row.get("failure"), []
    if not error:
        try:
            folder = join(output, row["safe"])
            fs, folder_path = get_fs(folder, so)
            remove_stale_temps(fs, folder_path)
            for pix, (h, w), alpha, stem in zip(row["pixels"], row["shapes"], row["alphas"], row["stems"]):
                rgb = np.frombuffer(pix, dtype=np.uint8).reshape(h, w, 3)
                a = np.frombuffer(alpha, dtype=np.uint8).reshape(h, w) if alpha is not None else None
                uri = join(folder, f"{stem}.png")
                write_bytes_atomic(fs, get_fs(uri, so)[1], encode_png(rgb, a))
                uris.append(uri)
        except Exception as exc:
            if is_transient(exc):  # the store, not the group: Ray Data retries the task (writes are idempotent)
                raise TransientStorageError(f"writing outputs of {row['identity']!r}: {short_error(exc)}") from exc
            traceback.print_exc()
            error, failure, uris = f"writing outputs failed: {short_error(exc)}", manifest.FAILURE_TRANSIENT, []
    published = _published_after(row, uris, ok=not error)
    keep = {uri for _, uri in published}
    removed, kept = remove_outputs([u for u in row.get("prev_outputs") or [] if u not in keep], output, so)
    published += [(stamp, uri) for stamp, uri in zip(row.get("prev_stamps") or [], row.get("prev_outputs") or [])
                  if uri in kept]
    out = manifest.ManifestRow(
        **record.model_dump(exclude={"notes"}),
        notes=list(record.notes) + list(row.get("photo_notes") or []),
        safe_name=row["safe"], input_uris=row["uris"] or [],
        num_photos=len(row["uris"] or []), attempts=row.get("attempts"),
        status=manifest.STATUS_FAILED if error else manifest.STATUS_OK, error=error, output_uris=uris,
        failure_class=(failure or manifest.FAILURE_TRANSIENT) if error else None,
        input_fingerprint=row.get("fingerprint"), removed_output_uris=removed,
        seconds=time.time() - row["started_at"] if row.get("started_at") else None,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    )
    return {"safe": row["safe"], "row": out.model_dump_json(), "published": [list(p) for p in published],
            "prev_known": row.get("prev_known") is not False}


def write_batch(batch: pa.Table, config_json: str, output: str) -> pa.Table:
    cfg = config_from(config_json)

    def one(row: dict[str, Any]) -> dict[str, Any]:
        try:
            return write_group(row, cfg, output)
        except TransientStorageError:
            raise  # Ray Data retries the task
        except Exception as exc:  # never drop the identity: it goes on to its commit as a failed row
            traceback.print_exc()
            return write_group(dict(row, error=f"writing outputs failed: {short_error(exc)}", pixels=None,
                                    failure=manifest.FAILURE_TRANSIENT), cfg, output)

    return table_of([one(row) for row in batch.to_pylist()], WRITTEN_SCHEMA)


def commit_rows(written: list[dict[str, Any]], cfg, output: str, run_id: str) -> list[dict[str, Any]]:
    """The commit: one Parquet file for all these identities (after their PNGs), then their states."""
    from concurrent.futures import ThreadPoolExecutor

    so = cfg.batch.storage_options
    rows = [manifest.ManifestRow.model_validate_json(w["row"]) for w in written]
    try:
        manifest.write_records(output, run_id, rows, so)
        records_error = None
    except Exception as exc:
        if is_transient(exc):  # the file name is deterministic: a retried task overwrites its own file
            raise TransientStorageError(f"committing {len(rows)} manifest rows: {short_error(exc)}") from exc
        traceback.print_exc()
        records_error = f"committing its manifest row failed: {short_error(exc)}"

    def save_state(pair) -> str | None:
        """None when committed; else why not (the driver names the identity, a rerun redoes it)."""
        w, row = pair
        if records_error:
            return records_error
        if not w["prev_known"]:
            return None
        try:
            manifest.write_state(output, w["safe"], manifest.state_of(row, [tuple(p) for p in w["published"]]), so)
        except Exception as exc:
            if is_transient(exc):  # the whole commit task re-runs; its records file is overwritten, not duplicated
                raise TransientStorageError(f"saving the state of {row.identity!r}: {short_error(exc)}") from exc
            traceback.print_exc()
            return f"saving its committed state failed: {short_error(exc)}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.batch.listing_threads, len(rows)))) as pool:
        problems = list(pool.map(save_state, zip(written, rows)))
    return [{"identity": r.identity, "status": r.status, "failure_class": r.failure_class,
             "error": problem or r.error, "committed": problem is None,
             "seconds": r.seconds, "engine_seconds": r.engine_seconds, "pgd_steps": r.pgd_steps,
             "lambdas": [v for v in (r.lambda_schedule or []) if v is not None]} for r, problem in zip(rows, problems)]


def commit_batch(batch: pa.Table, config_json: str, output: str, run_id: str) -> pa.Table:
    cfg = config_from(config_json)
    return table_of(commit_rows(batch.to_pylist(), cfg, output, run_id), SUMMARY_SCHEMA)
