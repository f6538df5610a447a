"""Stage 3, decode (CPU tasks): read every photo of the identity through fsspec and decode it safely.

A group with any unusable photo fails as a whole, with every bad file and its reason in the error:
CAP optimises the group together, and publishing part of it silently would lose photos.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from capray.batch.rows import GROUP_SCHEMA
from capray.batch.stages.base import Stage, short_error
from capray.io import manifest
from capray.io.allowlist import read_problem
from capray.io.images import BadImage, decode_image
from capray.io.storage import TransientStorageError, get_fs, inside, is_transient, read_bytes

# An unreadable photo is the input's fault when the file is gone or not a file; other OSErrors
# (timeouts, throttling, connection resets) are the infrastructure's, and the next run retries them.
# So is a refused read (PermissionError): an IAM policy or KMS key misconfigured for the job refuses
# every photo alike, and once it is fixed a rerun must retry them, not skip them as failed for good.
INPUT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class DecodeStage(Stage):
    """Plan rows → group rows with the decoded pixels. `allowed`: prefixes the photo URIs must lie
    under (`capray.io.allowlist`), checked again where the bytes are read; None: no check. A photo
    held fixed (append mode) is read from its published output under `output`, not from the input."""

    output_schema = GROUP_SCHEMA

    def __init__(self, cfg, allowed: list[str] | None = None, ledger_name: str | None = None,
                 output: str | None = None):
        super().__init__(cfg)
        self.allowed, self.ledger_name, self.output = allowed, ledger_name, output
        self._ledger = None

    def stopping(self) -> bool:
        """The run is stopping (its attempt ledger says so): read nothing more, give the identity back."""
        if not self.ledger_name:
            return False
        if self._ledger is None:
            from capray.batch.attempts import LedgerClient

            self._ledger = LedgerClient(self.ledger_name)
        return self._ledger.stopping()

    def fetch(self, uri: str, max_bytes: int | None = None):
        """One file's bytes through fsspec, decoded with the job's limits (raises BadImage/OSError)."""
        b, o = self.cfg.batch, self.cfg.output
        fs, path = get_fs(uri, b.storage_options)
        return decode_image(read_bytes(fs, path, max_bytes or b.max_file_bytes), max_pixels=b.max_image_pixels,
                            min_side=b.min_image_side, keep_capture_time=o.keep_capture_time,
                            keep_location=o.keep_location)

    def read(self, uri: str):
        """An input photo, once its URI passes the allowlist."""
        if not uri:
            raise BadImage("empty URI in the input catalog")
        refused = read_problem(uri, self.allowed)
        if refused:
            raise BadImage(refused)
        return self.fetch(uri)

    def read_published(self, uri: str, name: str, notes: list[str]):
        """A published output held fixed (append mode), or None when it cannot be used: then its photo
        is protected again from the input, and the row's notes say so."""
        try:
            if self.output is None or not inside(uri, self.output):
                raise BadImage(f"{uri} is not inside OUTPUT")
            # our own lossless output of a photo that passed the limits: it may be larger than its JPEG was
            return self.fetch(uri, max(self.cfg.batch.max_file_bytes, 5 * self.cfg.batch.max_image_pixels))
        except (BadImage, ValueError, OSError) as exc:
            if is_transient(exc):
                raise TransientStorageError(f"reading {uri}: {short_error(exc)}") from exc
            why = exc if isinstance(exc, BadImage) else short_error(exc)
            notes.append(f"{name}: its published output could not be held fixed ({why}); protected again")
            return None

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row, started_at=time.time())
        if row.get("deleted"):
            return out
        if self.stopping():
            return dict(out, deferred=True)
        if row.get("problem"):
            return dict(out, error=row["problem"], failure=row.get("failure") or manifest.FAILURE_INPUT)
        b = self.cfg.batch
        pixels, shapes, alphas, iccs, exifs, notes, bad, transient = [], [], [], [], [], [], [], False
        held = list(row.get("fixed_outputs") or [None] * len(row["uris"]))
        if all(held):  # only photos removed: nothing to protect, nothing to read
            return dict(out, pixels=[], shapes=[], alphas=[], iccs=[], exifs=[], photo_notes=[])
        total = 0
        for i, uri in enumerate(row["uris"]):
            name = posixpath.basename(uri) or uri
            decoded = self.read_published(held[i], name, notes) if held[i] else None
            if decoded is None:
                held[i] = None
                try:
                    decoded = self.read(uri)
                except (BadImage, ValueError, OSError) as exc:  # OSError: missing file, permission, network
                    if is_transient(exc):  # the store, not the photo: Ray Data retries the task
                        raise TransientStorageError(f"reading {uri}: {short_error(exc)}") from exc
                    bad.append(f"{name}: {exc if isinstance(exc, BadImage) else short_error(exc)}")
                    transient |= isinstance(exc, OSError) and not isinstance(exc, INPUT_OS_ERRORS)
                    continue
            total += decoded.rgb.shape[0] * decoded.rgb.shape[1]
            if total > b.max_group_pixels:  # one GPU holds the whole group: refuse it here, not in an OOM
                return dict(out, failure=manifest.FAILURE_INPUT,
                            error=f"the identity's photos hold over {total} pixels, over batch.max_group_pixels="
                                  f"{b.max_group_pixels}; split the identity or raise the limit")
            pixels.append(decoded.rgb.tobytes())
            shapes.append(list(decoded.rgb.shape[:2]))
            alphas.append(decoded.alpha.tobytes() if decoded.alpha is not None else None)
            iccs.append(decoded.icc)
            exifs.append(decoded.exif)
            notes.extend(f"{name}: {n}" for n in decoded.notes)
        if bad:
            return dict(out, error=f"{len(bad)} of {len(row['uris'])} photos unusable; nothing written for this "
                                   f"identity: " + "; ".join(bad),
                        failure=manifest.FAILURE_TRANSIENT if transient else manifest.FAILURE_INPUT)
        return dict(out, pixels=pixels, shapes=shapes, alphas=alphas, iccs=iccs, exifs=exifs, photo_notes=notes,
                    fixed_outputs=held if any(held) else None)
