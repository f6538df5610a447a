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

import posixpath
import time
import traceback
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from capray.attack.api import ProtectionRecord, RunInfo
from capray.io import manifest
from capray.io.images import BadImage, decode_image, encode_png
from capray.io.storage import get_fs, join, read_bytes, remove_stale_temps, write_bytes_atomic

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
    ("identity", pa.string()), ("status", pa.string()), ("failure_class", pa.string()), ("error", pa.string()),
    ("seconds", pa.float64()),
    ("engine_seconds", pa.float64()), ("pgd_steps", pa.int32()), ("lambdas", pa.list_(pa.float64())),
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
INPUT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# -- stage 1: decode ----------------------------------------------------------------------------------

def decode_group(row: dict[str, Any], cfg) -> dict[str, Any]:
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
            fs, path = get_fs(uri, b.storage_options)
            decoded = decode_image(read_bytes(fs, path, b.max_file_bytes), max_pixels=b.max_image_pixels,
                                   min_side=b.min_image_side)
        except (BadImage, ValueError, OSError) as exc:  # OSError: missing file, permission, network
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


def decode_batch(batch: pa.Table, config_json: str) -> pa.Table:
    cfg = config_from(config_json)
    return table_of([decode_group(row, cfg) for row in batch.to_pylist()], GROUP_SCHEMA)


# -- stage 2: protect (actor) ---------------------------------------------------------------------------

class ProtectActor:
    """Models loaded once per actor; one engine call per group. Ray Data restarts a killed actor and
    retries its batch, so a group interrupted by a crash is simply recomputed (same seed, same pixels)."""

    CONFIG_JSON: str | None = None  # set on the subclass the pipeline builds

    def __init__(self, config_json: str | None = None):
        self.cfg = config_from(config_json or self.CONFIG_JSON)
        self.models = self.load_models()

    def load_models(self):
        from capray import load_models

        return load_models(self.cfg.model)

    def run_engine(self, rgbs: list[np.ndarray], identity: str):
        """The engine call: (protected arrays, ProtectionRecord). Benchmarks and tests put a stand-in here."""
        from capray.attack.api import protect_arrays

        return protect_arrays(rgbs, self.cfg, identity, self.models)

    def protect(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("error"):
            return row
        rgbs = [np.frombuffer(p, dtype=np.uint8).reshape(h, w, 3).copy()  # writable: torch wants to own it
                for p, (h, w) in zip(row["pixels"], row["shapes"])]
        attempts, retries = 0, self.cfg.batch.group_retries
        while True:
            attempts += 1
            try:
                protected, record = self.run_engine(rgbs, row["identity"])
                return dict(row, pixels=[a.tobytes() for a in protected], record=record.model_dump_json(),
                            attempts=attempts)
            except ValueError as exc:  # the engine's verdict on the group itself: retrying cannot help
                return dict(row, pixels=None, error=f"engine refused the group: {exc}", attempts=attempts,
                            failure=manifest.FAILURE_INPUT)
            except Exception as exc:  # e.g. a transient device error: retry, then record it
                if attempts > retries:
                    return dict(row, pixels=None, attempts=attempts, failure=manifest.FAILURE_TRANSIENT,
                                error=f"protection failed after {attempts} attempts: {short_error(exc)}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of([self.protect(row) for row in batch.to_pylist()], GROUP_SCHEMA)


# -- stage 3: encode + write (per identity), then commit (many identities per record file) ----------------

def remove_outputs(uris: list[str], storage_options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Delete earlier outputs whose source is gone or changed; returns (removed, still there)."""
    removed, kept = [], []
    for uri in uris:
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
    record = (ProtectionRecord.model_validate_json(row["record"]) if row.get("record")
              else ProtectionRecord(**RunInfo.of(cfg).run_fields()))  # the engine never saw this group
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
            traceback.print_exc()
            error, failure, uris = f"writing outputs failed: {short_error(exc)}", manifest.FAILURE_TRANSIENT, []
    published = _published_after(row, uris, ok=not error)
    keep = {uri for _, uri in published}
    removed, kept = remove_outputs([u for u in row.get("prev_outputs") or [] if u not in keep], so)
    published += [(stamp, uri) for stamp, uri in zip(row.get("prev_stamps") or [], row.get("prev_outputs") or [])
                  if uri in kept]
    out = manifest.ManifestRow(
        **record.model_dump(exclude={"notes"}),
        notes=list(record.notes) + list(row.get("photo_notes") or []),
        identity=row["identity"], safe_name=row["safe"], input_uris=row["uris"] or [],
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
    return table_of([write_group(row, cfg, output) for row in batch.to_pylist()], WRITTEN_SCHEMA)


def commit_rows(written: list[dict[str, Any]], cfg, output: str, run_id: str) -> list[dict[str, Any]]:
    """The commit: one Parquet file for all these identities (after their PNGs), then their states."""
    from concurrent.futures import ThreadPoolExecutor

    so = cfg.batch.storage_options
    rows = [manifest.ManifestRow.model_validate_json(w["row"]) for w in written]
    manifest.write_records(output, run_id, rows, so)

    def save_state(pair):
        w, row = pair
        if w["prev_known"]:
            manifest.write_state(output, w["safe"], manifest.state_of(row, [tuple(p) for p in w["published"]]), so)

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.batch.listing_threads, len(rows)))) as pool:
        list(pool.map(save_state, zip(written, rows)))
    return [{"identity": r.identity, "status": r.status, "failure_class": r.failure_class, "error": r.error,
             "seconds": r.seconds, "engine_seconds": r.engine_seconds, "pgd_steps": r.pgd_steps,
             "lambdas": [v for v in (r.lambda_schedule or []) if v is not None]} for r in rows]


def commit_batch(batch: pa.Table, config_json: str, output: str, run_id: str) -> pa.Table:
    cfg = config_from(config_json)
    return table_of(commit_rows(batch.to_pylist(), cfg, output, run_id), SUMMARY_SCHEMA)
