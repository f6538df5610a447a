"""Before any work: validate input/output, find identities, decide what this run still has to do.

Refusals here (overlapping input and output, an OUTPUT that holds a run with a different engine
config, unreadable input) are usage errors: nothing is written and the command exits with 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from capray import __version__
from capray.config import CaprayConfig
from capray.io import manifest
from capray.io.discover import Discovery, discover
from capray.io.naming import identity_problem, output_stems, rejected_name, safe_name
from capray.io.storage import (
    get_fs,
    inside,
    join,
    normalize_uri,
    overlaps,
    redact,
    remove_stale_temps,
    write_bytes_atomic,
)

RUN_FILE = "run.json"


class UsageError(Exception):
    """A problem with the command line, config or locations: exit code 2, nothing written."""


@dataclass
class Plan:
    input: str
    output: str
    discovery: Discovery
    pending: list[dict[str, Any]]  # PLAN_SCHEMA rows still to do
    skipped: int  # identities already `ok` in OUTPUT
    total: int
    notes: list[str] = field(default_factory=list)


def check_locations(input_uri: str, output_uri: str, found: Discovery) -> None:
    if found.kind == "folder" and overlaps(input_uri, output_uri):
        raise UsageError(f"OUTPUT {output_uri} overlaps INPUT {input_uri}; choose an output outside the input")
    if found.kind == "manifest":
        if inside(input_uri, output_uri):
            raise UsageError(f"the input manifest {input_uri} lies inside OUTPUT {output_uri}")
        for group in found.groups:
            for uri in group.uris:
                if uri and inside(uri, output_uri):
                    raise UsageError(f"input photo {uri} (identity {group.identity!r}) lies inside OUTPUT "
                                     f"{output_uri}; choose an output outside the input")


def shared_folders(identities: list[str]) -> dict[str, list[str]]:
    """identity → the other identities whose output folder (and record) it would share.

    The naming rule makes this empty unless 64-bit hashes collide or names differ only in case
    (one folder on a case-insensitive store); such identities fail instead of mixing outputs."""
    owners: dict[str, list[str]] = {}
    for identity in identities:
        if identity_problem(identity) is None:
            owners.setdefault(safe_name(identity).casefold(), []).append(identity)
    return {i: [o for o in group if o != i] for group in owners.values() if len(group) > 1 for i in group}


def plan_rows(found: Discovery, cfg: CaprayConfig, done: set[str]) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    limit = cfg.batch.max_photos_per_identity
    sharing = shared_folders([g.identity for g in found.groups])
    for group in found.groups:
        if group.identity in done:
            skipped += 1
            continue
        problem = identity_problem(group.identity)
        safe = rejected_name(group.identity) if problem else safe_name(group.identity)
        if not problem and group.identity in sharing:
            problem = (f"identity {group.identity!r} would share the output folder {safe!r} with "
                       f"{', '.join(map(repr, sharing[group.identity]))} (names equal but for case, or a hash "
                       "collision); rename one of them")
            safe = rejected_name(group.identity)  # its failed row must not land on the other's record
        elif not problem and not group.uris:
            problem = "identity has no photos"
        elif not problem and len(group.uris) > limit:
            problem = (f"identity has {len(group.uris)} photos, over batch.max_photos_per_identity={limit}; "
                       "split it or raise the limit")
        rows.append({"identity": group.identity, "safe": safe, "uris": group.uris,
                     "stems": output_stems(group.uris), "problem": problem})
    return rows, skipped


def _previous_run(output: str, so: dict[str, Any]) -> dict[str, Any] | None:
    fs, path = get_fs(join(output, RUN_FILE), so)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def make_plan(input_uri: str, output_uri: str, cfg: CaprayConfig) -> Plan:
    from capray.models.preflight import preflight

    so = cfg.batch.storage_options
    input_uri, output_uri = normalize_uri(input_uri), normalize_uri(output_uri)
    try:
        preflight(cfg.model)
        found = discover(input_uri, so)
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        raise UsageError(str(exc)) from None
    check_locations(input_uri, output_uri, found)
    previous = _previous_run(output_uri, so)
    if previous and previous.get("config_hash") != cfg.config_hash():
        raise UsageError(f"OUTPUT {output_uri} holds a run with engine config {previous.get('config_hash')}, "
                         f"this run's is {cfg.config_hash()}; resume needs the same config (or use a new OUTPUT)")
    if previous:  # a writer killed mid-commit leaves a hidden temp file; it never counts as a row
        fs, path = get_fs(join(output_uri, manifest.MANIFEST_DIR), so)
        remove_stale_temps(fs, path)
    done = manifest.done_identities(output_uri, so) if previous else set()
    pending, skipped = plan_rows(found, cfg, done)
    return Plan(input_uri, output_uri, found, pending, skipped, len(found.groups))


def write_run_file(plan: Plan, cfg: CaprayConfig, extra: dict[str, Any] | None = None) -> str:
    """OUT/run.json: the effective config (secrets redacted) and what this run found."""
    import ray

    effective = cfg.model_dump(mode="json")
    effective["batch"]["storage_options"] = redact(effective["batch"]["storage_options"])
    body = {
        "capray_version": __version__, "ray_version": ray.__version__, "config_hash": cfg.config_hash(),
        "input": plan.input, "input_kind": plan.discovery.kind, "output": plan.output,
        "identities": plan.total, "skipped_already_ok": plan.skipped, "ignored_input_entries": plan.discovery.ignored,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": effective,
        **(extra or {}),
    }
    uri = join(plan.output, RUN_FILE)
    fs, path = get_fs(uri, cfg.batch.storage_options)
    write_bytes_atomic(fs, path, json.dumps(body, indent=2, sort_keys=True).encode())
    return uri
