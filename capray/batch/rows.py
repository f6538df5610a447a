"""The rows that flow between the job's stages, one row per identity, and their Arrow schemas.

Every stage emits a table with an explicit schema, so blocks of failed and ok identities
concatenate; a stage's output schema is the next stage's input.

    CANDIDATE (listing) → PLAN (check) → GROUP (decode, protect) → WRITTEN (write) → SUMMARY (commit)
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from capray.io import manifest

# An identity as listed: a name (folder input: its photos are listed by the check stage) or a name with
# its photos (catalog input, or a Dataset a platform hands to the processor).
CANDIDATE_SCHEMA = pa.schema([
    ("identity", pa.string()), ("uris", pa.list_(pa.string())), ("sizes", pa.list_(pa.int64())),
    ("versions", pa.list_(pa.string())),
])
PLAN_SCHEMA = pa.schema([
    ("identity", pa.string()), ("safe", pa.string()), ("uris", pa.list_(pa.string())),
    ("stems", pa.list_(pa.string())), ("problem", pa.string()),
    ("failure", pa.string()),  # the failure class of `problem`/`error`: manifest.FAILURE_INPUT or _TRANSIENT
    ("stamps", pa.list_(pa.string())), ("fingerprint", pa.string()),  # the input as listed (see discover.Photo)
    ("prev_stamps", pa.list_(pa.string())), ("prev_outputs", pa.list_(pa.string())),  # what is published now
    ("prev_known", pa.bool_()),  # False: the committed state could not be read; leave it as it is
])
GROUP_SCHEMA = pa.schema(list(PLAN_SCHEMA) + [
    ("error", pa.string()), ("started_at", pa.float64()),
    ("pixels", pa.list_(pa.large_binary())), ("shapes", pa.list_(pa.list_(pa.int32()))),
    ("alphas", pa.list_(pa.large_binary())), ("photo_notes", pa.list_(pa.string())),
    ("record", pa.string()), ("attempts", pa.int32()),
])
WRITTEN_SCHEMA = pa.schema([
    ("safe", pa.string()), ("row", pa.string()), ("published", pa.list_(pa.list_(pa.string()))),
    ("prev_known", pa.bool_()),
])
SUMMARY_SCHEMA = pa.schema([
    *(manifest.SCHEMA.field(name) for name in
      ("identity", "status", "failure_class", "error", "output_uris", "seconds", "engine_seconds", "pgd_steps")),
    ("lambdas", manifest.SCHEMA.field("lambda_schedule").type),  # the chosen λ only (no nulls before k̂)
    ("committed", pa.bool_()),  # False: the row or state could not be committed; the driver names it
])


def table_of(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
