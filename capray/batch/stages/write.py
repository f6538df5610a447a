"""Stage 5, write (CPU tasks): encode the identity's PNGs, write them atomically, remove earlier outputs
whose source is gone or changed (all of them for an identity removed from the input), and pass on
the identity's (not yet committed) manifest row."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from capray.attack.api import ProtectionRecord
from capray.batch.rows import WRITTEN_SCHEMA
from capray.batch.stages.base import Stage, short_error
from capray.io import manifest
from capray.io.images import encode_png
from capray.io.storage import (
    TransientStorageError,
    get_fs,
    inside,
    is_transient,
    join,
    remove_stale_temps,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)


def remove_outputs(uris: list[str], output: str, storage_options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Delete earlier outputs whose source is gone or changed; returns (removed, still there).

    The URIs come from the saved state, which names OUTPUT as it was when they were written: after
    OUTPUT is copied or moved they point at the old place. Only files inside this OUTPUT are
    deleted; any other is left alone, logged and no longer counted as published here."""
    removed, kept = [], []
    for uri in uris:
        if not inside(uri, output):
            log.warning("not removing %s: the saved state names it but it is outside OUTPUT %s", uri, output)
            continue
        fs, path = get_fs(uri, storage_options)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass  # already gone (e.g. removed by an attempt that crashed before its commit)
        except OSError:
            log.exception("removing %s failed; it stays published and the next run tries again", uri)
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
    written = {"identity": row["identity"], "safe": row["safe"], "prev_known": row.get("prev_known") is not False}
    if row.get("deferred"):  # given back by a stopping run: nothing written, nothing to commit
        return dict(written, row=None, deferred=True)
    # a group the engine never saw gets the run's fields and notes (the tiny model's label) all the same
    record = (ProtectionRecord.model_validate_json(row["record"]) if row.get("record")
              else ProtectionRecord.unprotected(cfg, row["identity"]))
    error, failure, uris = row.get("error"), row.get("failure"), []
    deleted = bool(row.get("deleted"))
    if not error and not deleted:
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
            log.exception("writing the outputs of %r failed", row["identity"])
            error, failure, uris = f"writing outputs failed: {short_error(exc)}", manifest.FAILURE_TRANSIENT, []
    published = [] if deleted else _published_after(row, uris, ok=not error)
    keep = {uri for _, uri in published}
    removed, kept = remove_outputs([u for u in row.get("prev_outputs") or [] if u not in keep], output, so)
    published += [(stamp, uri) for stamp, uri in zip(row.get("prev_stamps") or [], row.get("prev_outputs") or [])
                  if uri in kept]
    failure_class = (failure or manifest.FAILURE_TRANSIENT) if error else None
    status = manifest.STATUS_DELETED if deleted else manifest.STATUS_FAILED if error else manifest.STATUS_OK
    out = manifest.ManifestRow(
        **record.model_dump(exclude={"notes"}),
        notes=list(record.notes) + list(row.get("photo_notes") or []),
        safe_name=row["safe"], input_uris=row["uris"] or [],
        num_photos=len(row["uris"] or []), attempts=row.get("attempts"),
        status=status, error=error, output_uris=uris, failure_class=failure_class,
        input_fingerprint=row.get("fingerprint"), removed_output_uris=removed,
        published_stamps=[s for s, _ in published], published_uris=[u for _, u in published],
        transient_failures=(row.get("prev_transient_failures") or 0) + 1
        if failure_class == manifest.FAILURE_TRANSIENT else 0,
        seconds=time.time() - row["started_at"] if row.get("started_at") else None,
        finished_at=datetime.now(UTC).isoformat(timespec="microseconds"),
    )
    return dict(written, row=out.model_dump_json(), deferred=False)


class WriteStage(Stage):
    """Group rows → written rows (the identity's manifest row, not yet committed, and what is published)."""

    output_schema = WRITTEN_SCHEMA

    def __init__(self, cfg, output: str):
        super().__init__(cfg)
        self.output = output

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return write_group(row, self.cfg, self.output)

    def failed(self, row: dict[str, Any], error: str) -> dict[str, Any]:
        """Never drop the identity: it goes on to its commit as a failed row."""
        return write_group(dict(row, error=f"writing outputs failed: {error}", pixels=None,
                                failure=manifest.FAILURE_TRANSIENT), self.cfg, self.output)
