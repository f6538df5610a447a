"""Stage 2, check (CPU tasks, a thread pool of requests each): what is left to do, decided in the cluster.

For each candidate identity: list its photos (folder input) or stat them (catalog rows without
size/ETag), fingerprint the input, read the identity's committed state and drop the identity when it
is done — `ok`, or failed for its input, with the same input. Everything else goes on as a plan row
carrying what the previous commit published, so the write stage can remove outputs whose source is
gone. A catalog photo URI outside the allowlist (`capray.io.allowlist`) fails its identity for its
input here, before any request is made for it.

Driver cost per 1,000 identities: nothing but one tally call per check batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from capray.batch.rows import PLAN_SCHEMA, table_of
from capray.batch.stages.base import Stage, short_error
from capray.io import manifest
from capray.io.allowlist import uri_problem
from capray.io.discover import IdentityGroup, Photo, fingerprint, list_photos, stat_photos
from capray.io.naming import identity_problem, output_stems, rejected_name, safe_name
from capray.io.storage import get_fs, inside

log = logging.getLogger(__name__)


def group_problem(identity: str, photos: list[Photo], limit: int, output: str) -> str | None:
    """Why this identity cannot be protected as it stands (an *input* failure), or None."""
    problem = identity_problem(identity)
    if problem:
        return problem
    if not photos:
        return "identity has no photos"
    if len(photos) > limit:
        return (f"identity has {len(photos)} photos, over batch.max_photos_per_identity={limit}; "
                "split it or raise the limit")
    for photo in photos:
        if photo.uri and inside(photo.uri, output):
            return f"input photo {photo.uri} lies inside OUTPUT {output}; choose an output outside the input"
    return None


def refused_photos(group: IdentityGroup, allowed: list[str] | None) -> str | None:
    """Why the identity may not be read at all (photo URIs outside the allowlist), or None."""
    if allowed is None:
        return None
    refused = [problem for problem in (uri_problem(p.uri, allowed) for p in group.photos if p.uri) if problem]
    if not refused:
        return None
    return (f"{len(refused)} of {len(group.photos)} photo URIs refused; nothing read for this identity: "
            + "; ".join(refused))


class CheckStage(Stage):
    """Candidates → plan rows of the identities still to do; skipped ones are only counted (tally).

    `input_root`: the folder input whose identity folders are listed here (None: candidates carry their
    photos); `allowed`: prefixes photo URIs must lie under (None: no check); `resuming`: OUTPUT holds an
    earlier run, so each identity's committed state is read."""

    output_schema = PLAN_SCHEMA

    def __init__(self, cfg, output: str, *, input_root: str | None, allowed: list[str] | None, resuming: bool,
                 tally=None):
        super().__init__(cfg)
        self.output, self.input_root, self.allowed, self.resuming, self.tally = (
            output, input_root, allowed, resuming, tally)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from capray.batch.tally import report

        candidates = batch.to_pylist()
        with ThreadPoolExecutor(max_workers=min(self.cfg.batch.listing_threads, max(1, len(candidates)))) as pool:
            results = list(pool.map(self.guarded, candidates))
        rows = [r for r in results if isinstance(r, dict)]
        ignored = [u for r in rows for u in r.pop("ignored", None) or []]
        names = [c.get("identity") for c in candidates]  # identities are unique in a run: the batch's key
        report(self.tally, f"check:{len(names)}:{names[0] if names else ''}:{names[-1] if names else ''}",
               skipped_ok=results.count("skipped_ok"), skipped_input=results.count("skipped_input"),
               ignored=ignored)
        return table_of(rows, PLAN_SCHEMA)

    def failed(self, row: dict[str, Any], error: str) -> dict[str, Any]:
        """Never lose an identity here: it goes on as a transient failure."""
        ident = row.get("identity") or ""
        safe = rejected_name(ident) if identity_problem(ident) else safe_name(ident)
        return {"identity": ident, "safe": safe, "uris": [], "stems": [], "prev_known": False,
                "problem": f"checking the identity failed: {error}", "failure": manifest.FAILURE_TRANSIENT}

    def process(self, candidate: dict[str, Any]) -> dict[str, Any] | str:
        """A plan row for an identity still to do, or "skipped_ok"/"skipped_input" when it is done."""
        so, output = self.cfg.batch.storage_options, self.output
        identity = "" if candidate["identity"] is None else candidate["identity"]
        problem = identity_problem(identity)
        safe = rejected_name(identity) if problem else safe_name(identity)
        row: dict[str, Any] = {"identity": identity, "safe": safe, "prev_known": True}
        try:
            previous = manifest.read_state(output, safe, so) if self.resuming else None
        except OSError as exc:  # cannot tell what is published: redo, and leave the state as it is
            previous, row["prev_known"] = None, False
            return dict(row, uris=[], stems=[], problem=f"reading the committed state failed: {short_error(exc)}",
                        failure=manifest.FAILURE_TRANSIENT)
        if previous is not None and previous.identity != identity:
            # the folder (and state) belongs to another identity: a 64-bit hash collision, or names equal
            # but for case on a case-insensitive store. Fail this one; never mix two identities' outputs.
            return dict(row, safe=rejected_name(identity), uris=[], stems=[], failure=manifest.FAILURE_INPUT,
                        problem=f"identity {identity!r} would share the output folder {safe!r} with identity "
                                f"{previous.identity!r} (names equal but for case, or a hash collision); rename one")
        if previous is not None:
            row["prev_stamps"] = [s for s, _ in previous.published]
            row["prev_outputs"] = [u for _, u in previous.published]
        try:
            if candidate.get("uris") is None:  # folder input: list this identity's photos here, not on the driver
                fs, root = get_fs(self.input_root, so)
                group = list_photos(fs, root, identity)
            else:
                n = len(candidate["uris"])
                group = IdentityGroup(identity, [Photo(u, s, v) for u, s, v in zip(
                    candidate["uris"], candidate.get("sizes") or [None] * n, candidate.get("versions") or [None] * n)])
                refused = refused_photos(group, self.allowed)
                if refused:  # before any request: a stat with the job's credentials is already a read
                    return _planned(row, previous, group, refused, manifest.FAILURE_INPUT)
                group = stat_photos(lambda uri: get_fs(uri, so), group)
        except (OSError, ValueError) as exc:
            return dict(row, uris=[], stems=[], problem=f"listing the identity's photos failed: {short_error(exc)}",
                        failure=manifest.FAILURE_TRANSIENT)
        problem = group_problem(identity, group.photos, self.cfg.batch.max_photos_per_identity, output)
        return _planned(row, previous, group, problem, manifest.FAILURE_INPUT if problem else None)


def _planned(row: dict[str, Any], previous, group: IdentityGroup, problem: str | None,
             failure: str | None) -> dict[str, Any] | str:
    """The plan row of a listed identity, or "skipped_ok"/"skipped_input" when its input is done."""
    digest = fingerprint(group.photos)
    if previous is not None and previous.is_done(digest):
        return "skipped_ok" if previous.status == manifest.STATUS_OK else "skipped_input"
    uris = group.uris
    return dict(row, uris=uris, stems=output_stems(uris), stamps=[p.stamp() for p in group.photos],
                fingerprint=digest, problem=problem, failure=failure, ignored=group.ignored)
