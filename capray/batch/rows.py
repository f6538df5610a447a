"""The rows that flow between the job's stages, one row per identity, and their Arrow schemas.

Every stage emits a table with an explicit schema, so blocks of failed and ok identities
concatenate; a stage's output schema is the next stage's input.

    CANDIDATE (listing) → PLAN (check) → GROUP (decode, protect) → WRITTEN (write) → SUMMARY (commit)
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from capray.io import manifest

# An identity as listed, with its photos (optional sizes and versions, e.g. ETags). A sweep
# (`capray/batch/sweep.py`) attaches the identity's committed state (`prev_state`, an IdentityState as
# JSON; None: never committed) and marks identities removed from the input (`deleted`); rows of a
# platform's own Dataset carry neither, and the check stage reads their state itself.
CANDIDATE_SCHEMA = pa.schema([
    ("identity", pa.string()), ("uris", pa.list_(pa.string())), ("sizes", pa.list_(pa.int64())),
    ("versions", pa.list_(pa.string())), ("problem", pa.string()), ("prev_state", pa.string()),
    ("state_attached", pa.bool_()), ("deleted", pa.bool_()),
])
PLAN_SCHEMA = pa.schema([
    ("identity", pa.string()), ("safe", pa.string()), ("uris", pa.list_(pa.string())),
    ("stems", pa.list_(pa.string())), ("problem", pa.string()),
    ("failure", pa.string()),  # the failure class of `problem`/`error`: manifest.FAILURE_INPUT or _TRANSIENT
    ("stamps", pa.list_(pa.string())), ("fingerprint", pa.string()),  # the input as listed (see discover.Photo)
    ("prev_stamps", pa.list_(pa.string())), ("prev_outputs", pa.list_(pa.string())),  # what is published now
    ("prev_runs", pa.list_(pa.string())),  # the run that published each of prev_outputs
    # append mode, aligned with uris: the published output held fixed for that photo, or null to protect it
    ("fixed_outputs", pa.list_(pa.string())),
    ("prev_known", pa.bool_()),  # False: the committed state could not be read; leave it as it is
    ("prev_transient_failures", pa.int32()),  # runs in a row it failed transiently (quarantine counts on)
    ("deleted", pa.bool_()),  # removed from the input: its outputs are removed, nothing is protected
])
GROUP_SCHEMA = pa.schema(list(PLAN_SCHEMA) + [
    ("error", pa.string()), ("started_at", pa.float64()),
    ("pixels", pa.list_(pa.large_binary())), ("shapes", pa.list_(pa.list_(pa.int32()))),
    ("alphas", pa.list_(pa.large_binary())), ("photo_notes", pa.list_(pa.string())),
    # per photo, written with its output: its RGB colour profile and its EXIF as the metadata policy keeps it
    ("iccs", pa.list_(pa.large_binary())), ("exifs", pa.list_(pa.large_binary())),
    ("record", pa.string()), ("attempts", pa.int32()),
    ("deferred", pa.bool_()),  # not started: the run was stopping (time box, SIGTERM); the next run does it
])
WRITTEN_SCHEMA = pa.schema([
    ("identity", pa.string()), ("safe", pa.string()), ("row", pa.string()), ("prev_known", pa.bool_()),
    ("deferred", pa.bool_()),  # then `row` is None: nothing to commit
])
SUMMARY_SCHEMA = pa.schema([
    *(manifest.SCHEMA.field(name) for name in
      ("identity", "status", "failure_class", "error", "output_uris", "seconds", "engine_seconds", "pgd_steps",
       "lambda_collapsed")),
    ("lambdas", manifest.STEPS_SCHEMA.field("lambda_schedule").type),  # the chosen λ only (no nulls before k̂)
    ("committed", pa.bool_()),  # False: the row or state could not be committed; the driver names it
    ("deferred", pa.bool_()),  # given back unstarted by a stopping run (not committed, not a failure)
])


def table_of(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
