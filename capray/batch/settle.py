"""No identity vanishes: after the stream ends, every pending identity that did not commit gets a row.

An identity can fail to come back with a committed row in two ways: its manifest row could not be
written (the write stage says so), or Ray Data dropped its block after every retry (a task that kept
raising, a group whose actor kept dying past `max_task_retries`: `max_errored_blocks=-1` lets the
other identities go on). The driver then writes a `failed` row for each such identity with the reason
it knows. Only when even that write fails is the identity counted *unfinished*, and then it is named
on stderr; a rerun with the same OUTPUT redoes it either way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

DROPPED = "its pipeline task failed after every retry and Ray Data dropped it (the driver log has the error)"
NAMED_ON_STDERR = 20


def settle_missing(pending: Iterable[dict[str, Any]], committed: set[str], reasons: dict[str, str],
                   cfg, output: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Write `failed` rows for pending identities without a commit; returns (rows written, unfinished)."""
    from capray.batch.stages import write_group

    written, unfinished = [], []
    for row in pending:
        identity = row["identity"]
        if identity in committed:
            continue
        reason = f"not finished: {reasons.get(identity, DROPPED)}; rerun to retry"
        try:
            summary = write_group(dict(row, error=reason), cfg, output)
        except Exception as exc:
            summary = {"committed": False, "error": f"{type(exc).__name__}: {exc}"}
        if summary.get("committed"):
            written.append(identity)
        else:
            unfinished.append((identity, f"{reason} (and its failed row could not be written: {summary['error']})"))
    for identity, why in unfinished[:NAMED_ON_STDERR]:
        print(f"capray protect: unfinished identity {identity!r}: {why}", file=sys.stderr)
    if len(unfinished) > NAMED_ON_STDERR:
        print(f"capray protect: … and {len(unfinished) - NAMED_ON_STDERR} more unfinished identities",
              file=sys.stderr)
    return written, unfinished
