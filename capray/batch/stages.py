"""The three stages of the job, each a plain callable on one pyarrow batch (one row = one identity).

- `decode_batch` (CPU tasks): read every photo of the identity through fsspec and decode it safely;
  a group with any unusable photo fails as a whole, with every bad file and its reason in the error
  (CAP optimises the group together, and publishing part of it silently would lose photos).
- `ProtectActor` (GPU actor pool): loads the models once, then calls the engine per group. It is a
  thin shell around `protect_arrays`; nothing here knows about storage.
- `write_batch` (CPU tasks): encode PNGs, write them atomically, then commit the identity's manifest
  row (the commit record for resume), and return a small summary row for progress and metrics.

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

from capray.attack.api import ProtectionRecord, RunInfo
from capray.io import manifest
from capray.io.allowlist import uri_problem
from capray.io.images import BadImage, decode_image, encode_png
from capray.io.storage import (
    TransientStorageError,
    get_fs,
    is_transient,
    join,
    read_bytes,
    remove_stale_temps,
    write_bytes_atomic,
)

PLAN_SCHEMA = pa.schema([
    ("identity", pa.string()), ("safe", pa.string()), ("uris", pa.list_(pa.string())),
    ("stems", pa.list_(pa.string())), ("problem", pa.string()),
])
GROUP_SCHEMA = pa.schema(list(PLAN_SCHEMA) + [
    ("error", pa.string()), ("started_at", pa.float64()),
    ("pixels", pa.list_(pa.large_binary())), ("shapes", pa.list_(pa.list_(pa.int32()))),
    ("alphas", pa.list_(pa.large_binary())), ("photo_notes", pa.list_(pa.string())),
    ("record", pa.string()), ("attempts", pa.int32()),
])
SUMMARY_SCHEMA = pa.schema([
    ("identity", pa.string()), ("status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()),
    ("engine_seconds", pa.float64()), ("pgd_steps", pa.int32()), ("lambdas", pa.list_(pa.float64())),
    ("committed", pa.bool_()),
])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _config(config_json: str):
    from capray.config import CaprayConfig

    return CaprayConfig.model_validate_json(config_json)


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- stage 1: decode ----------------------------------------------------------------------------------

def decode_group(row: dict[str, Any], cfg, allowed: list[str] | None = None) -> dict[str, Any]:
    """`allowed`: prefixes the photo URIs must lie under (`capray.io.allowlist`); None: no check."""
    out = dict(row, started_at=time.time())
    if row.get("problem"):
        return dict(out, error=row["problem"])
    b = cfg.batch
    pixels, shapes, alphas, notes, bad = [], [], [], [], []
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
                raise TransientStorageError(f"reading {uri}: {_short_error(exc)}") from exc
            bad.append(f"{name}: {exc if isinstance(exc, BadImage) else _short_error(exc)}")
            continue
        pixels.append(decoded.rgb.tobytes())
        shapes.append(list(decoded.rgb.shape[:2]))
        alphas.append(decoded.alpha.tobytes() if decoded.alpha is not None else None)
        notes.extend(f"{name}: {n}" for n in decoded.notes)
    if bad:
        return dict(out, error=f"{len(bad)} of {len(row['uris'])} photos unusable; nothing written for this "
                               f"identity: " + "; ".join(bad))
    return dict(out, pixels=pixels, shapes=shapes, alphas=alphas, photo_notes=notes)


def decode_batch(batch: pa.Table, config_json: str, allowed: list[str] | None = None) -> pa.Table:
    cfg = _config(config_json)
    return _table([decode_group(row, cfg, allowed) for row in batch.to_pylist()], GROUP_SCHEMA)


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

    def __init__(self, config_json: str | None = None):
        from capray.batch.attempts import LedgerClient

        self.cfg = _config(config_json or self.CONFIG_JSON)
        self.models = self.load_models()
        self.ledger = LedgerClient(self.LEDGER_NAME)
        self.consecutive_errors = 0

    def load_models(self):
        from capray import load_models

        return load_models(self.cfg.model)

    def run_engine(self, rgbs: list[np.ndarray], identity: str):
        from capray.attack.api import protect_arrays

        return protect_arrays(rgbs, self.cfg, identity, self.models)

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

        def failed(error: str, attempts: int) -> dict[str, Any]:
            return done(dict(row, pixels=None, error=error, attempts=attempts))

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
                return failed(f"engine refused the group: {exc}", attempt)
            except Exception as exc:  # transient: a device or runtime error
                self.consecutive_errors += 1
                error = _short_error(exc)
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
        return _table([self.protect(row) for row in batch.to_pylist()], GROUP_SCHEMA)


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


# -- stage 3: encode + write + commit ---------------------------------------------------------------------

def write_group(row: dict[str, Any], cfg, output: str) -> dict[str, Any]:
    so = cfg.batch.storage_options
    record = (ProtectionRecord.model_validate_json(row["record"]) if row.get("record")
              else ProtectionRecord(**RunInfo.of(cfg).run_fields()))  # the engine never saw this group
    error, uris = row.get("error"), []
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
                raise TransientStorageError(f"writing outputs of {row['identity']!r}: {_short_error(exc)}") from exc
            traceback.print_exc()
            error, uris = f"writing outputs failed: {_short_error(exc)}", []
    out = manifest.ManifestRow(
        **record.model_dump(exclude={"notes"}),
        notes=list(record.notes) + list(row.get("photo_notes") or []),
        identity=row["identity"], safe_name=row["safe"], input_uris=row["uris"] or [],
        num_photos=len(row["uris"] or []), attempts=row.get("attempts"),
        status=manifest.STATUS_FAILED if error else manifest.STATUS_OK, error=error, output_uris=uris,
        seconds=time.time() - row["started_at"] if row.get("started_at") else None,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    summary = {"identity": out.identity, "status": out.status, "error": out.error, "seconds": out.seconds,
               "engine_seconds": out.engine_seconds, "pgd_steps": out.pgd_steps,
               "lambdas": [v for v in (out.lambda_schedule or []) if v is not None], "committed": True}
    try:
        manifest.write_part(output, row["safe"], out, so)  # the commit: after every PNG is in place
    except Exception as exc:
        if is_transient(exc):
            raise TransientStorageError(f"committing {row['identity']!r}: {_short_error(exc)}") from exc
        # no row could be written: the driver names this identity (capray.batch.settle), never just a log line
        return dict(summary, committed=False, error=f"committing its manifest row failed: {_short_error(exc)}")
    return summary


def write_batch(batch: pa.Table, config_json: str, output: str) -> pa.Table:
    cfg = _config(config_json)
    return _table([write_group(row, cfg, output) for row in batch.to_pylist()], SUMMARY_SCHEMA)

