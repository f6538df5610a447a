"""Stage 5, write (CPU tasks): encode the identity's photos (`output.format`, each with its colour profile
and kept metadata), write them atomically, remove earlier outputs
whose source is gone or changed (all of them for an identity removed from the input), and pass on
the identity's (not yet committed) manifest row. Published outputs held fixed (append mode) are
never rewritten."""

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
from capray.io.images import encode_photo, output_format
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


def _previous(row: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(input stamp, output URI, run that protected it) of what was published before this attempt."""
    stamps, outputs = row.get("prev_stamps") or [], row.get("prev_outputs") or []
    runs = row.get("prev_runs") or [None] * len(outputs)
    return list(zip(stamps, outputs, runs))


def _published_after(row: dict[str, Any], outputs: list[str], run_id: str | None,
                     ok: bool) -> list[tuple[str, str, str | None]]:
    """(input stamp, output URI, run) triples that stay published once this attempt is committed.
    `outputs`: per input photo, its output after this run (held fixed, or written now)."""
    previous = _previous(row)
    if ok:
        run_of = {uri: run for _, uri, run in previous}
        held = set(row.get("fixed_outputs") or [])
        return [(stamp, uri, run_of.get(uri) if uri in held else run_id) for stamp, uri in zip(row["stamps"], outputs)]
    if row.get("stamps") is None:  # the input could not be listed: nothing is known to be gone
        return previous
    current = set(row["stamps"])
    return [entry for entry in previous if entry[0] in current]  # unchanged sources keep theirs


def _collision(held: list[str | None], new_uris: dict[int, str]) -> str | None:
    """Why a photo to protect would overwrite another photo's published output (names chosen to hit one)."""
    fixed = {uri for uri in held if uri}
    clash = sorted(uri for uri in new_uris.values() if uri in fixed)
    return (f"the output name of a new photo equals the published output {clash[0]} of another photo of the "
            "identity; rename the new photo") if clash else None


def write_group(row: dict[str, Any], cfg, output: str, run_id: str | None = None) -> dict[str, Any]:
    """Write the identity's photos and remove outputs whose source is gone; returns its uncommitted row.

    In append mode (`fixed_outputs`) only the photos to protect now are written; the others keep their
    published outputs untouched."""
    so = cfg.batch.storage_options
    written = {"identity": row["identity"], "safe": row["safe"], "prev_known": row.get("prev_known") is not False}
    if row.get("deferred"):  # given back by a stopping run: nothing written, nothing to commit
        return dict(written, row=None, deferred=True)
    # a group the engine never saw gets the run's fields and notes (the tiny model's label) all the same
    record = (ProtectionRecord.model_validate_json(row["record"]) if row.get("record")
              else ProtectionRecord.unprotected(cfg, row["identity"]))
    error, failure = row.get("error"), row.get("failure")
    deleted = bool(row.get("deleted"))
    held = list(row.get("fixed_outputs") or [None] * len(row.get("uris") or []))
    todo = [i for i, h in enumerate(held) if h is None]  # the photos protected now, in input order
    new_uris: dict[int, str] = {}
    encode_notes: list[str] = []
    if not error and not deleted:
        folder = join(output, row["safe"])
        formats = {i: output_format(cfg.output.format, row["shapes"][i]) for i in todo}
        new_uris = {i: join(folder, f"{row['stems'][i]}.{fmt}") for i, (fmt, _) in formats.items()}
        encode_notes = [f"{row['stems'][i]}: {note}" for i, (_, note) in formats.items() if note]
        error = _collision(held, new_uris)
        failure = manifest.FAILURE_INPUT if error else failure
    if not error and not deleted:
        try:
            fs, folder_path = get_fs(folder, so)
            remove_stale_temps(fs, folder_path)
            iccs, exifs = row.get("iccs") or [None] * len(held), row.get("exifs") or [None] * len(held)
            for i, pix in zip(todo, row["pixels"]):
                (h, w), alpha = row["shapes"][i], row["alphas"][i]
                rgb = np.frombuffer(pix, dtype=np.uint8).reshape(h, w, 3)
                a = np.frombuffer(alpha, dtype=np.uint8).reshape(h, w) if alpha is not None else None
                encoded = encode_photo(rgb, a, fmt=formats[i][0], icc=iccs[i], exif=exifs[i])
                write_bytes_atomic(fs, get_fs(new_uris[i], so)[1], encoded.data)
        except Exception as exc:
            if is_transient(exc):  # the store, not the group: Ray Data retries the task (writes are idempotent)
                raise TransientStorageError(f"writing outputs of {row['identity']!r}: {short_error(exc)}") from exc
            log.exception("writing the outputs of %r failed", row["identity"])
            error, failure = f"writing outputs failed: {short_error(exc)}", manifest.FAILURE_TRANSIENT
    ok = not error and not deleted
    outputs = [held[i] or new_uris[i] for i in range(len(held))] if ok else []
    published = [] if deleted else _published_after(row, outputs, run_id, ok=ok)
    keep = {uri for _, uri, _ in published}
    removed, kept = remove_outputs([u for u in row.get("prev_outputs") or [] if u not in keep], output, so)
    published += [entry for entry in _previous(row) if entry[1] in kept]
    failure_class = (failure or manifest.FAILURE_TRANSIENT) if error else None
    status = manifest.STATUS_DELETED if deleted else manifest.STATUS_FAILED if error else manifest.STATUS_OK
    fixed = [h for h in held if h] if ok else []
    mode = (manifest.MODE_KEPT if not todo else manifest.MODE_APPEND if fixed else manifest.MODE_GROUP) if ok else None
    out = manifest.ManifestRow(
        **record.model_dump(exclude={"notes"}),
        notes=list(record.notes) + list(row.get("photo_notes") or []) + encode_notes,
        safe_name=row["safe"], input_uris=row["uris"] or [],
        num_photos=len(row["uris"] or []), attempts=row.get("attempts"),
        status=status, error=error, output_uris=outputs, failure_class=failure_class,
        input_fingerprint=row.get("fingerprint"), removed_output_uris=removed,
        published_stamps=[s for s, _, _ in published], published_uris=[u for _, u, _ in published],
        published_runs=[r for _, _, r in published], run_id=run_id, protection_mode=mode,
        protected_uris=[new_uris[i] for i in todo] if ok else [], fixed_uris=fixed,
        transient_failures=(row.get("prev_transient_failures") or 0) + 1
        if failure_class == manifest.FAILURE_TRANSIENT else 0,
        seconds=time.time() - row["started_at"] if row.get("started_at") else None,
        finished_at=datetime.now(UTC).isoformat(timespec="microseconds"),
    )
    return dict(written, row=out.model_dump_json(), deferred=False)


class WriteStage(Stage):
    """Group rows → written rows (the identity's manifest row, not yet committed, and what is published)."""

    output_schema = WRITTEN_SCHEMA

    def __init__(self, cfg, output: str, run_id: str | None = None):
        super().__init__(cfg)
        self.output, self.run_id = output, run_id

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return write_group(row, self.cfg, self.output, self.run_id)

    def failed(self, row: dict[str, Any], error: str) -> dict[str, Any]:
        """Never drop the identity: it goes on to its commit as a failed row."""
        return write_group(dict(row, error=f"writing outputs failed: {error}", pixels=None,
                                failure=manifest.FAILURE_TRANSIENT), self.cfg, self.output, self.run_id)
