"""Before any work: validate input/output and describe the run; *not* a list of the library.

The identities themselves are found while the job runs (`capray/batch/sweep.py`), so planning costs
the same for 10 identities or 10 million. Refusals here (overlapping input and output, an OUTPUT
that holds a run with a different engine config or an unreadable run.json, missing or unreadable
input) are usage errors: nothing is written and the command exits with 2.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from capray import __version__
from capray.config import CaprayConfig
from capray.io import manifest
from capray.io.discover import CATALOG_SUFFIXES, catalog_files, is_catalog, is_folder
from capray.io.storage import (
    get_fs,
    inside,
    join,
    normalize_uri,
    overlaps,
    redacted_config,
    remove_stale_temps,
    write_bytes_atomic,
)

RUN_FILE = "run.json"
DATASET_INPUT = "ray.data.Dataset"  # run.json's `input` when a processor was applied to a caller's Dataset


class UsageError(Exception):
    """A problem with the command line, config or locations: exit code 2, nothing written."""


@dataclass
class Plan:
    input: str
    output: str
    kind: str  # "folder", "catalog" (files of identity, uri rows) or "dataset" (a processor's caller's Dataset)
    catalog_files: list[str]  # URIs of the catalog input's files (a handful, even for 100M photos)
    resuming: bool  # OUTPUT holds an earlier run: the done-check reads each identity's committed state
    run_id: str  # names this run's commit files
    started_at: str
    # OUTPUT's lease this run writes under (`capray.io.lease.Lease.fence`): every commit checks it first.
    # None for a processor applied to a platform's own Dataset (no lease).
    fence: dict[str, Any] | None = None


def _previous_run(output: str, so: dict[str, Any]) -> dict[str, Any] | None:
    """OUTPUT's run.json, or None for a new OUTPUT. One that exists but cannot be read (a missing KMS
    permission, a hand edit) stops the run: treating OUTPUT as new would redo everything and
    overwrite the record of what is there."""
    uri = join(output, RUN_FILE)
    fs, path = get_fs(uri, so)
    fs.invalidate_cache(path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{uri} exists but cannot be read ({type(exc).__name__}: {exc}); fix its permissions "
                         "or remove it (OUTPUT is then treated as new)") from None
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        return body
    except ValueError as exc:
        raise UsageError(f"{uri} is not a capray run file ({exc}); restore it or remove it (OUTPUT is then "
                         "treated as new)") from None


def _check_input(input_uri: str, output_uri: str, so: dict[str, Any]) -> tuple[str, list[str]]:
    fs, path = get_fs(input_uri, so)
    fs.invalidate_cache(path)  # a rerun must see the input as it is now, not a cached listing
    if is_catalog(input_uri):
        files = catalog_files(fs, path)
        if not files:
            raise FileNotFoundError(f"catalog {input_uri} not found")
        uris = [f if "://" not in input_uri else fs.unstrip_protocol(f) for f in files]
        for uri in uris:
            if inside(uri, output_uri):
                raise UsageError(f"the input catalog {uri} lies inside OUTPUT {output_uri}")
        return "catalog", uris
    if not is_folder(fs, path):  # not `fs.isdir`: on S3 that lists the whole ROOT here, on the driver
        raise FileNotFoundError(f"input {input_uri} is neither a folder/prefix nor a catalog "
                                f"({', '.join(CATALOG_SUFFIXES)})")
    if overlaps(input_uri, output_uri):
        raise UsageError(f"OUTPUT {output_uri} overlaps INPUT {input_uri}; choose an output outside the input")
    return "folder", []


def make_plan(input_uri: str, output_uri: str, cfg: CaprayConfig) -> Plan:
    from capray.models.preflight import preflight

    so = cfg.batch.storage_options
    input_uri, output_uri = normalize_uri(input_uri), normalize_uri(output_uri)
    try:
        preflight(cfg.model)
        kind, files = _check_input(input_uri, output_uri, so)
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        raise UsageError(str(exc)) from None
    return _plan(input_uri, output_uri, kind, files, cfg)


def dataset_plan(output_uri: str, cfg: CaprayConfig) -> Plan:
    """The plan of a processor applied to a Dataset the caller built: nothing to list, OUTPUT checked."""
    return _plan(DATASET_INPUT, normalize_uri(output_uri), "dataset", [], cfg)


def _plan(input_uri: str, output_uri: str, kind: str, files: list[str], cfg: CaprayConfig) -> Plan:
    """Check OUTPUT against the run it may hold (same engine config to resume) and name this run."""
    so = cfg.batch.storage_options
    previous = _previous_run(output_uri, so)
    if previous and previous.get("config_hash") != cfg.config_hash():
        raise UsageError(f"OUTPUT {output_uri} holds a run with engine config {previous.get('config_hash')}, "
                         f"this run's is {cfg.config_hash()}; resume needs the same config (or use a new OUTPUT)")
    if previous:  # a writer killed mid-commit leaves a hidden temp file; it never counts as a row
        fs, path = manifest.manifest_path(output_uri, so)
        remove_stale_temps(fs, path)
        remove_stale_temps(fs, join(path, manifest.STATE_DIR))
    now = datetime.now(UTC)
    run_id = now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    return Plan(input_uri, output_uri, kind, files, previous is not None, run_id, now.isoformat(timespec="seconds"))


def write_run_file(plan: Plan, cfg: CaprayConfig, extra: dict[str, Any] | None = None) -> str:
    """OUT/run.json: the effective config (secrets redacted); rewritten at the end with the run's totals."""
    import ray

    effective = redacted_config(cfg)
    body = {
        "capray_version": __version__, "ray_version": ray.__version__, "config_hash": cfg.config_hash(),
        "input": plan.input, "input_kind": plan.kind, "output": plan.output, "run_id": plan.run_id,
        "started_at": plan.started_at, "config": effective, "notes": cfg.model.notes,
        **(extra or {}),
    }
    uri = join(plan.output, RUN_FILE)
    fs, path = get_fs(uri, cfg.batch.storage_options)
    write_bytes_atomic(fs, path, json.dumps(body, indent=2, sort_keys=True).encode())
    return uri
