"""Stage 2, check (CPU tasks, a thread pool of requests each): what is left to do, decided in the cluster.

For each candidate identity: stat its photos where the listing gave no size/ETag (bare catalog
rows), fingerprint the input, take its committed state (attached by the sweep, or read here for a
platform's own Dataset) and drop the identity when it is done — `ok`, failed for its input, or
quarantined after `batch.quarantine_after` transient failures in a row, with the same input.
Everything else goes on as a plan row carrying what the previous commit published, so the write
stage can remove outputs whose source is gone (all of them for an identity removed from the
input), and, with `batch.on_added_photos: append`, which published outputs of unchanged photos the
group holds fixed (`fixed_outputs`) while only its added or replaced photos are protected. A photo
URI outside the allowlist (`capray.io.allowlist`) fails its identity for its input here, before any
request is made for it.

Driver cost per 1,000 identities: nothing but one tally call per check batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from capray.batch.rows import PLAN_SCHEMA, table_of
from capray.batch.stages.base import Stage, short_error
from capray.batch.tally import VERDICTS, report
from capray.io import manifest
from capray.io.allowlist import uri_problem
from capray.io.discover import IdentityGroup, Photo, fingerprint, stat_photos
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

    Candidates from a sweep carry their committed state; for others (a platform's Dataset) it is read
    here when `resuming` (OUTPUT holds an earlier run). `allowed`: prefixes photo URIs must lie under
    (None: no check)."""

    output_schema = PLAN_SCHEMA

    def __init__(self, cfg, output: str, *, allowed: list[str] | None, resuming: bool, tally=None):
        super().__init__(cfg)
        self.output, self.allowed, self.resuming, self.tally = output, allowed, resuming, tally

    def __call__(self, batch: pa.Table) -> pa.Table:
        candidates = batch.to_pylist()
        with ThreadPoolExecutor(max_workers=min(self.cfg.batch.listing_threads, max(1, len(candidates)))) as pool:
            results = list(pool.map(self.guarded, candidates))
        rows = [r for r in results if isinstance(r, dict)]
        names = [c.get("identity") for c in candidates]  # identities are unique in a run: the batch's key
        report(self.tally, f"check:{len(names)}:{names[0] if names else ''}:{names[-1] if names else ''}",
               **{verdict: results.count(verdict) for verdict in VERDICTS})
        return table_of(rows, PLAN_SCHEMA)

    def failed(self, row: dict[str, Any], error: str) -> dict[str, Any]:
        """Never lose an identity here: it goes on as a transient failure."""
        ident = row.get("identity") or ""
        safe = rejected_name(ident) if identity_problem(ident) else safe_name(ident)
        return {"identity": ident, "safe": safe, "uris": [], "stems": [], "prev_known": False,
                "problem": f"checking the identity failed: {error}", "failure": manifest.FAILURE_TRANSIENT}

    def previous(self, candidate: dict[str, Any], safe: str) -> manifest.IdentityState | None:
        """The identity's committed state; for an identity new to the sweep, the state of its output
        folder (one GET, only for new identities), so that one taking over another's folder is caught."""
        if candidate.get("state_attached") and candidate.get("prev_state"):
            return manifest.IdentityState.model_validate_json(candidate["prev_state"])
        return manifest.read_state(self.output, safe, self.cfg.batch.storage_options) if self.resuming else None

    def process(self, candidate: dict[str, Any]) -> dict[str, Any] | str:
        """A plan row for an identity still to do, or one of VERDICTS when it is done."""
        so, output = self.cfg.batch.storage_options, self.output
        identity = "" if candidate["identity"] is None else candidate["identity"]
        problem = identity_problem(identity)
        safe = rejected_name(identity) if problem else safe_name(identity)
        row: dict[str, Any] = {"identity": identity, "safe": safe, "prev_known": True}
        try:
            previous = self.previous(candidate, safe)
        except OSError as exc:  # cannot tell what is published: redo, and leave the state as it is
            row["prev_known"] = False
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
            row["prev_runs"] = previous.published_runs or [None] * len(previous.published)
            row["prev_transient_failures"] = previous.transient_failures
        if candidate.get("deleted"):
            return dict(row, uris=[], stems=[], stamps=[], deleted=True)
        uris = candidate.get("uris") or []
        sizes, versions = candidate.get("sizes") or [None] * len(uris), candidate.get("versions") or [None] * len(uris)
        group = IdentityGroup(identity, [Photo(u, s, v) for u, s, v in zip(uris, sizes, versions)],
                              problem=candidate.get("problem"))
        refused = refused_photos(group, self.allowed)
        if refused:  # before any request: a stat with the job's credentials is already a read
            return _planned(row, previous, group, refused, manifest.FAILURE_INPUT, self.cfg, output)
        try:
            group = stat_photos(lambda uri: get_fs(uri, so), group)
        except (OSError, ValueError) as exc:
            return dict(row, uris=[], stems=[], problem=f"listing the identity's photos failed: {short_error(exc)}",
                        failure=manifest.FAILURE_TRANSIENT)
        problem = group.problem or group_problem(identity, group.photos, self.cfg.batch.max_photos_per_identity,
                                                 output)
        return _planned(row, previous, group, problem, manifest.FAILURE_INPUT if problem else None, self.cfg,
                        output)


def _planned(row: dict[str, Any], previous, group: IdentityGroup, problem: str | None,
             failure: str | None, cfg, output: str) -> dict[str, Any] | str:
    """The plan row of a listed identity, or one of VERDICTS when its input is done."""
    digest = fingerprint(group.photos)
    if previous is not None and not group.problem:
        verdict = previous.verdict(digest, cfg.batch.quarantine_after, cfg.batch.retry_quarantined)
        if verdict is not None:
            return verdict
    uris = group.uris
    return dict(row, uris=uris, stems=output_stems(uris), stamps=[p.stamp() for p in group.photos],
                fingerprint=digest, problem=problem, failure=failure,
                fixed_outputs=None if problem or cfg.batch.on_added_photos != "append"
                else fixed_outputs(previous, group, output))


def fixed_outputs(previous, group: IdentityGroup, output: str) -> list[str | None] | None:
    """Append mode: per photo, its published output when the photo is unchanged since (held fixed),
    None where it is new or replaced (protected now); None when no photo is published (the whole group).

    A published photo is never re-perturbed: an attacker holding two differently protected copies of
    one photo could average them. Only outputs inside OUTPUT are held (the state of a moved OUTPUT
    names the old place; those photos are protected again rather than read from elsewhere).
    """
    if previous is None:
        return None
    published = {stamp: uri for stamp, uri in previous.published if inside(uri, output)}
    held = [published.get(photo.stamp()) for photo in group.photos]
    return held if any(held) else None
