"""No identity vanishes silently: what the driver says about identities that did not commit.

An identity ends a run in one of three ways: skipped by the done-check, committed (its `ok` or
`failed` row and its state written), or unfinished. Every stage turns an unexpected error into a
`failed` row for that identity (`stages.guarded`), so unfinished means one of:
- its commit itself failed (the manifest row or the state could not be written): the commit stage
  says so and the driver names the identity here;
- Ray Data dropped its block after every retry (a worker that kept dying outside a group, storage that
  stayed down through `batch.io_retries`): the driver knows only the count (listed − skipped − committed),
  since it never holds the list of identities.
Either way a rerun with the same OUTPUT redoes it: its state was not committed.
"""

from __future__ import annotations

import sys

NAMED_ON_STDERR = 20
NAMES_KEPT = 1000  # the summary keeps this many names; a storage outage could otherwise make millions


def report_uncommitted(uncommitted: list[tuple[str, str]], total: int) -> list[str]:
    """Name identities whose commit failed on stderr (the first few of `total`; the caller keeps at most
    NAMES_KEPT) and return the names kept."""
    for identity, why in uncommitted[:NAMED_ON_STDERR]:
        print(f"capray protect: unfinished identity {identity!r}: not committed: {why}; rerun to retry",
              file=sys.stderr)
    if total > NAMED_ON_STDERR:
        print(f"capray protect: … and {total - NAMED_ON_STDERR} more identities not committed", file=sys.stderr)
    return [identity for identity, _ in uncommitted[:NAMES_KEPT]]
