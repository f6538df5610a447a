"""Where the job's identities come from, streamed into Ray Data, and the distributed done-check.

- Folder input: `IdentityFolders`, a Ray Data datasource with one read task that lists ROOT page by
  page and yields each page of identity names as a block. The driver lists nothing.
- Manifest input: one task per manifest file (`manifest_candidates`) scans it in record batches and
  yields its identity groups; the files must be sorted by identity (checked, see `capray/io/discover.py`).
- `check_batch` (CPU tasks, a thread pool of requests each): lists one identity's photos (folders) or
  stats them (manifests without size/ETag), fingerprints the input, reads the identity's committed
  state and drops identities that are done: `ok` or failed for their input, with the same input.
  Everything else goes on as a plan row, carrying what the previous commit published so the write
  stage can remove outputs whose source is gone. A manifest photo URI outside the allowlist
  (`capray.io.allowlist`) fails its identity for its input here, before any request is made for it.

Driver cost per 1,000 identities: nothing but one tally call per listing batch.
"""

from __future__ import annotations

import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from capray.batch.stages import PLAN_SCHEMA, short_error, table_of
from capray.io import manifest
from capray.io.allowlist import allowed_prefixes, uri_problem
from capray.io.discover import (
    IdentityGroup,
    Photo,
    fingerprint,
    iter_identity_names,
    iter_manifest_groups,
    list_photos,
    stat_photos,
)
from capray.io.naming import identity_problem, output_stems, rejected_name, safe_name
from capray.io.storage import get_fs, inside

CANDIDATE_SCHEMA = pa.schema([
    ("identity", pa.string()), ("uris", pa.list_(pa.string())), ("sizes", pa.list_(pa.int64())),
    ("versions", pa.list_(pa.string())),
])
GROUPS_PER_BLOCK = 1000


def _candidate_table(groups: list[IdentityGroup]) -> pa.Table:
    rows = [{"identity": g.identity, "uris": g.uris, "sizes": [p.size for p in g.photos],
             "versions": [p.version for p in g.photos]} for g in groups]
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


# -- folder input: the root listing as a streaming datasource ---------------------------------------------

def _folder_datasource(root: str, storage_options: dict[str, Any], tally):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    from capray.batch.tally import report

    class IdentityFolders(Datasource):
        """ROOT's identity folders, one block per listing page, from a single streaming read task."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                fs, path = get_fs(root, storage_options)
                for page, (names, ignored) in enumerate(iter_identity_names(fs, path)):
                    report(tally, f"list:{page}", listed=len(names), ignored=ignored)
                    if names:
                        yield pa.Table.from_pylist([{"identity": n} for n in names], schema=CANDIDATE_SCHEMA)
                report(tally, "listed:root", sources_done=1)

            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None),
                             schema=CANDIDATE_SCHEMA)]

    return IdentityFolders()


def candidates(plan, cfg, tally):
    """The Ray Dataset of candidate identities (name, and photos for manifests), built lazily."""
    import ray

    so = cfg.batch.storage_options
    if plan.kind == "folder":
        return ray.data.read_datasource(_folder_datasource(plan.input, so, tally), override_num_blocks=1)
    files = ray.data.from_items([{"file": f} for f in plan.manifest_files], override_num_blocks=len(plan.manifest_files))
    return files.map_batches(manifest_candidates, batch_size=1, batch_format="pyarrow",
                             num_cpus=cfg.batch.cpus_per_io_task, fn_kwargs={"storage_options": so, "tally": tally})


def manifest_candidates(batch: pa.Table, storage_options: dict[str, Any], tally):
    """One manifest file → blocks of its identity groups; an unusable file is reported, not half-used."""
    from capray.batch.tally import report

    for uri in batch.column("file").to_pylist():
        fs, path = get_fs(uri, storage_options)
        groups: list[IdentityGroup] = []
        blocks = 0
        try:
            for group in iter_manifest_groups(fs, path):
                groups.append(group)
                if len(groups) == GROUPS_PER_BLOCK:
                    report(tally, f"file:{uri}:{blocks}", listed=len(groups))
                    blocks += 1
                    yield _candidate_table(groups)
                    groups = []
        except (ValueError, OSError) as exc:
            report(tally, f"error:{uri}", source_error=str(exc))
            continue
        report(tally, f"file:{uri}:{blocks}", listed=len(groups), sources_done=1)
        if groups:
            yield _candidate_table(groups)


# -- the done-check -------------------------------------------------------------------------------------

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


def check_identity(candidate: dict[str, Any], cfg, plan_info: dict[str, Any]) -> dict[str, Any] | str:
    """A plan row for an identity still to do, or "skipped_ok"/"skipped_input" when it is done."""
    so, output = cfg.batch.storage_options, plan_info["output"]
    identity = "" if candidate["identity"] is None else candidate["identity"]
    problem = identity_problem(identity)
    safe = rejected_name(identity) if problem else safe_name(identity)
    row: dict[str, Any] = {"identity": identity, "safe": safe, "prev_known": True}
    try:
        previous = manifest.read_state(output, safe, so) if plan_info["resuming"] else None
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
            fs, root = get_fs(plan_info["input"], so)
            group = list_photos(fs, root, identity)
        else:
            group = IdentityGroup(identity, [Photo(u, s, v) for u, s, v in
                                             zip(candidate["uris"], candidate["sizes"], candidate["versions"])])
            refused = refused_photos(group, allowed_prefixes(plan_info["input"], cfg.batch.allowed_input_prefixes))
            if refused:  # before any request: a stat with the job's credentials is already a read
                return _planned(row, previous, group, refused, manifest.FAILURE_INPUT)
            group = stat_photos(lambda uri: get_fs(uri, so), group)
    except (OSError, ValueError) as exc:
        return dict(row, uris=[], stems=[], problem=f"listing the identity's photos failed: {short_error(exc)}",
                    failure=manifest.FAILURE_TRANSIENT)
    problem = group_problem(identity, group.photos, cfg.batch.max_photos_per_identity, output)
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


def refused_photos(group: IdentityGroup, allowed: list[str]) -> str | None:
    """Why the identity may not be read at all (photo URIs outside the allowlist), or None."""
    refused = [problem for problem in (uri_problem(p.uri, allowed) for p in group.photos if p.uri) if problem]
    if not refused:
        return None
    return (f"{len(refused)} of {len(group.photos)} photo URIs refused; nothing read for this identity: "
            + "; ".join(refused))


def check_batch(batch: pa.Table, config_json: str, plan_info: dict[str, Any], tally) -> pa.Table:
    """Candidates → plan rows of the identities still to do; skipped ones are only counted."""
    from capray.batch.stages import config_from
    from capray.batch.tally import report

    cfg = config_from(config_json)
    candidates_ = batch.to_pylist()

    def one(candidate):
        try:
            return check_identity(candidate, cfg, plan_info)
        except Exception as exc:  # never lose an identity here: it goes on as a transient failure
            traceback.print_exc()
            ident = candidate.get("identity") or ""
            safe = rejected_name(ident) if identity_problem(ident) else safe_name(ident)
            return {"identity": ident, "safe": safe, "uris": [], "stems": [], "prev_known": False,
                    "problem": f"checking the identity failed: {short_error(exc)}",
                    "failure": manifest.FAILURE_TRANSIENT}

    with ThreadPoolExecutor(max_workers=min(cfg.batch.listing_threads, max(1, len(candidates_)))) as pool:
        results = list(pool.map(one, candidates_))
    rows = [r for r in results if isinstance(r, dict)]
    ignored = [u for r in rows for u in r.pop("ignored", None) or []]
    names = [c.get("identity") for c in candidates_]  # identities are unique in a run: the batch's key
    report(tally, f"check:{len(names)}:{names[0] if names else ''}:{names[-1] if names else ''}",
           skipped_ok=results.count("skipped_ok"), skipped_input=results.count("skipped_input"), ignored=ignored)
    return table_of(rows, PLAN_SCHEMA)


def plan_info(plan) -> dict[str, Any]:
    return {"input": plan.input, "output": plan.output, "resuming": plan.resuming}
