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
])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _config(config_json: str):
    from capray.config import CaprayConfig

    return CaprayConfig.model_validate_json(config_json)


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- stage 1: decode ----------------------------------------------------------------------------------

def decode_group(row: dict[str, Any], cfg) -> dict[str, Any]:
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
            fs, path = get_fs(uri, b.storage_options)
            decoded = decode_image(read_bytes(fs, path, b.max_file_bytes), max_pixels=b.max_image_pixels,
                                   min_side=b.min_image_side)
        except (BadImage, ValueError, OSError) as exc:  # OSError: missing file, permission, network
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


def decode_batch(batch: pa.Table, config_json: str) -> pa.Table:
    cfg = _config(config_json)
    return _table([decode_group(row, cfg) for row in batch.to_pylist()], GROUP_SCHEMA)


# -- stage 2: protect (actor) ---------------------------------------------------------------------------

class ProtectActor:
    """Models loaded once per actor; one engine call per group. Ray Data restarts a killed actor and
    retries its batch, so a group interrupted by a crash is simply recomputed (same seed, same pixels)."""

    CONFIG_JSON: str | None = None  # set on the subclass the pipeline builds

    def __init__(self, config_json: str | None = None):
        from capray import load_models

        self.cfg = _config(config_json or self.CONFIG_JSON)
        self.models = load_models(self.cfg.model)

    def protect(self, row: dict[str, Any]) -> dict[str, Any]:
        from capray.attack.api import protect_arrays

        if row.get("error"):
            return row
        rgbs = [np.frombuffer(p, dtype=np.uint8).reshape(h, w, 3).copy()  # writable: torch wants to own it
                for p, (h, w) in zip(row["pixels"], row["shapes"])]
        attempts, retries = 0, self.cfg.batch.group_retries
        while True:
            attempts += 1
            try:
                protected, record = protect_arrays(rgbs, self.cfg, row["identity"], self.models)
                return dict(row, pixels=[a.tobytes() for a in protected], record=record.model_dump_json(),
                            attempts=attempts)
            except ValueError as exc:  # the engine's verdict on the group itself: retrying cannot help
                return dict(row, pixels=None, error=f"engine refused the group: {exc}", attempts=attempts)
            except Exception as exc:  # e.g. a transient device error: retry, then record it
                if attempts > retries:
                    return dict(row, pixels=None, attempts=attempts,
                                error=f"protection failed after {attempts} attempts: {_short_error(exc)}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _table([self.protect(row) for row in batch.to_pylist()], GROUP_SCHEMA)


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
    manifest.write_part(output, row["safe"], out, so)  # the commit: after every PNG is in place
    return {"identity": out.identity, "status": out.status, "error": out.error, "seconds": out.seconds,
            "engine_seconds": out.engine_seconds, "pgd_steps": out.pgd_steps,
            "lambdas": [v for v in (out.lambda_schedule or []) if v is not None]}


def write_batch(batch: pa.Table, config_json: str, output: str) -> pa.Table:
    cfg = _config(config_json)
    return _table([write_group(row, cfg, output) for row in batch.to_pylist()], SUMMARY_SCHEMA)

