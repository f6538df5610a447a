"""The sweep: walk the library in a fixed order from a cursor, and hand out what is left to do in slices.

A nightly run over 10M identities cannot hold the library anywhere, nor ask the store about each
identity. So one small actor (`Sweep`) walks the input in its sort order (a folder listing's key
order, or the catalog files merged by identity; `capray.io.discover`) and, range by range, reads the
committed state of the same range from the manifest's sorted main and delta files (`StateReader`:
a few GETs per 10,000 identities, each file read once per run). Comparing the two decides, without a
request per identity:

- listed, same input, done (`ok`, failed for its input, or quarantined): skipped, only counted;
- listed and new, changed or to retry: a candidate row, with its committed state attached;
- committed but no longer listed: a *deletion* row (its outputs are removed and recorded);
- listed without size and version (a bare catalog): a candidate row; the check stage stats it.

`next_slice` returns up to `batch.slice_identities` candidates (an Arrow table the driver passes
on by reference into that slice's own Ray Data execution) and the range (lo, hi] it covered. The
run starts after the cursor the last run stopped at, goes to the end, and wraps around to the
cursor, so every identity gets its turn however often runs are cut short.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from capray.batch.rows import CANDIDATE_SCHEMA
from capray.io import manifest
from capray.io.discover import (
    CATALOG_ORDER,
    FOLDER_ORDER,
    IdentityGroup,
    fingerprint,
    iter_catalog_sweep,
    iter_folder_groups,
    order_key,
)
from capray.io.storage import get_fs, is_transient, join, write_bytes_atomic

log = logging.getLogger(__name__)

SWEEP_FILE = "_sweep.json"  # in OUT/manifest/: where the next run starts
CHUNK = 1000  # identities compared with the state at a time (one listing page)
MAX_LISTED_PER_SLICE = 200_000  # a slice also ends after this many listed, so a no-op night reports progress
MAX_IGNORED_SAMPLE = 20


class StateReader:
    """The committed state of a range of identities, from the files `OUT/manifest/_index.json` names.

    Main files are disjoint sorted ranges: a sweep moving forward loads each once and drops it when
    the sweep has passed it. Delta files span every range; they are kept for the whole run (their
    rows are bounded by `batch.manifest_delta_ratio` of the main files')."""

    def __init__(self, output: str, storage_options: dict[str, Any], order: str):
        self.output, self.so, self.order = output, storage_options, order
        self.index = manifest.read_index(output, storage_options)
        self._main = {e.file for e in self.index.main}
        self._loaded: dict[str, tuple[list[str], list[int], pa.Table]] = {}

    def _bounds(self, entry: manifest.IndexedFile) -> tuple[str, str]:
        if self.order == FOLDER_ORDER:
            return entry.first_folder_key, entry.last_folder_key
        return entry.first, entry.last

    def _load(self, entry: manifest.IndexedFile) -> tuple[list[str], list[int], pa.Table]:
        if entry.file not in self._loaded:
            import pyarrow.parquet as pq

            fs, path = get_fs(join(self.output, manifest.MANIFEST_DIR, entry.file), self.so)
            parquet = pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))
            present = set(parquet.schema_arrow.names)  # files compacted by an older capray lack newer columns
            table = parquet.read(columns=[c for c in manifest.STATE_COLUMNS if c in present])
            keys = [order_key(i, self.order) for i in table.column("identity").to_pylist()]
            perm = sorted(range(len(keys)), key=keys.__getitem__)
            self._loaded[entry.file] = ([keys[i] for i in perm], perm, table)
        return self._loaded[entry.file]

    def states(self, after: str | None, until: str | None) -> dict[str, manifest.IdentityState]:
        """identity → latest committed state, for identities whose order key is in (after, until]."""
        latest: dict[str, dict[str, Any]] = {}
        for entry in self.index.files:
            first, last = self._bounds(entry)
            if (after is not None and last <= after) or (until is not None and first > until):
                if entry.file in self._main and after is not None and last <= after:
                    self._loaded.pop(entry.file, None)  # the sweep is past it
                continue
            keys, perm, table = self._load(entry)
            lo = 0 if after is None else bisect.bisect_right(keys, after)
            hi = len(keys) if until is None else bisect.bisect_right(keys, until)
            if lo >= hi:
                continue
            for row in table.take(pa.array(perm[lo:hi])).to_pylist():
                seen = latest.get(row["identity"])
                if seen is None or (row["finished_at"] or "") > (seen["finished_at"] or ""):
                    latest[row["identity"]] = row
        return {ident: manifest.IdentityState.of_row(row) for ident, row in latest.items()}


def read_cursor(output: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Where the last run stopped ({"order", "after"}); {} for a new OUTPUT. Unreadable: start over."""
    fs, path = get_fs(join(output, manifest.MANIFEST_DIR, SWEEP_FILE), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s is damaged; this run sweeps from the start", SWEEP_FILE)
        return {}


def write_cursor(output: str, storage_options: dict[str, Any], body: dict[str, Any]) -> None:
    fs, path = get_fs(join(output, manifest.MANIFEST_DIR, SWEEP_FILE), storage_options)
    write_bytes_atomic(fs, path, json.dumps(body, sort_keys=True).encode())


def _candidate(group: IdentityGroup, state: manifest.IdentityState | None, *, deleted: bool = False) -> dict:
    return {"identity": group.identity, "uris": group.uris, "sizes": [p.size for p in group.photos],
            "versions": [p.version for p in group.photos], "problem": group.problem,
            "prev_state": state.model_dump_json() if state is not None else None, "state_attached": True,
            "deleted": deleted}


class Sweep:
    """One run's walk over the input (a Ray actor; see the module docstring)."""

    def __init__(self, kind: str, input_uri: str, catalog_files: list[str], output: str, cfg_json: str,
                 after: str | None, retry_quarantined: bool = False):
        from capray.config import CaprayConfig

        cfg = CaprayConfig.model_validate_json(cfg_json)
        self.b, self.so = cfg.batch, cfg.batch.storage_options
        self.kind, self.input, self.files, self.output = kind, input_uri, catalog_files, output
        self.order = FOLDER_ORDER if kind == "folder" else CATALOG_ORDER
        self.retry_quarantined = retry_quarantined
        self.state: StateReader | None = None
        self.ignored: list[str] = []
        self.ignored_count = 0
        self.source_errors: list[str] = []
        # from the cursor to the end, then from the start back to the cursor
        self.phases = [(after, None), (None, after)] if after is not None else [(None, None)]
        self.phase, self.position = 0, self.phases[0][0]  # where the next chunk starts
        self._chunks: Iterator | None = None

    # -- listing -----------------------------------------------------------------------------------
    def _on_ignored(self, uri: str) -> None:
        self.ignored_count += 1
        if len(self.ignored) < MAX_IGNORED_SAMPLE:
            self.ignored.append(uri)

    def _on_source_error(self, uri: str, message: str) -> None:
        log.error("catalog file left out of this run: %s", message)
        self.source_errors.append(message)

    def _groups(self, after: str | None, until: str | None) -> Iterator[IdentityGroup]:
        if self.kind == "folder":
            fs, root = get_fs(self.input, self.so)
            return iter_folder_groups(fs, root, after, until, on_ignored=self._on_ignored)
        return iter_catalog_sweep(lambda uri: get_fs(uri, self.so), self.files, after, until,
                                  on_error=self._on_source_error)

    def _walk(self) -> Iterator[tuple[str | None, str | None, list[IdentityGroup]]]:
        """(after, until, groups) chunks covering each phase's range without gaps, as identity names,
        from `self.phase` and `self.position` on."""
        while self.phase < len(self.phases):
            until = self.phases[self.phase][1]
            groups = self._groups(self.position, until)
            while True:
                chunk = list(itertools.islice(groups, CHUNK))
                yield self.position, (chunk[-1].identity if chunk else until), chunk
                if not chunk:  # the rest of the phase's range: only deletions can be there
                    break
            self.phase += 1
            if self.phase < len(self.phases):
                self.position = self.phases[self.phase][0]

    # -- one slice ---------------------------------------------------------------------------------
    def next_slice(self) -> tuple[pa.Table, dict[str, Any]]:
        """Up to `batch.slice_identities` candidates, and what the slice covered and counted.

        A transient storage error (after the store client's own retries) restarts the slice from its
        beginning, with backoff, up to `batch.io_retries` times: nothing of it was handed out yet."""
        phase, position = self.phase, self.position
        for attempt in range(self.b.io_retries + 1):
            try:
                if self.state is None:
                    self.state = StateReader(self.output, self.so, self.order)
                if self._chunks is None:
                    self._chunks = self._walk()
                return self._slice()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.b.io_retries:
                    raise
                log.warning("the sweep hit a storage error (%s: %s); retrying its slice", type(exc).__name__, exc)
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
                self.phase, self.position, self._chunks = phase, position, None
        raise AssertionError("unreachable")

    def _slice(self) -> tuple[pa.Table, dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        info: dict[str, Any] = {"lo": self.position, "hi": self.position, "listed": 0, "skipped_ok": 0,
                                "skipped_input": 0, "quarantined": 0, "deletions": 0, "finished": False}
        while len(rows) < self.b.slice_identities and info["listed"] < MAX_LISTED_PER_SLICE:
            chunk = next(self._chunks, None)
            if chunk is None:
                info["finished"] = True
                break
            after, until, groups = chunk
            self._compare(after, until, groups, rows, info)
            info["hi"] = self.position = until
        info["ignored_count"], info["ignored_sample"] = self.ignored_count, list(self.ignored)
        info["source_errors"], info["todo"] = list(self.source_errors), len(rows)
        return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA), info

    def _compare(self, after, until, groups: list[IdentityGroup], rows: list[dict], info: dict) -> None:
        states = self.state.states(*(order_key(name, self.order) if name is not None else None
                                     for name in (after, until)))
        info["listed"] += len(groups)
        for group in groups:
            state = states.pop(group.identity, None)
            stamped = all(p.size is not None or p.version is not None for p in group.photos)
            if state is not None and stamped and group.problem is None:
                verdict = state.verdict(fingerprint(group.photos), self.b.quarantine_after, self.retry_quarantined)
                if verdict is not None:
                    info[verdict] += 1
                    continue
            rows.append(_candidate(group, state))
        # committed in this range but no longer listed: removed from the input. Never concluded from a
        # listing that left a catalog file out (its identities would look deleted).
        for ident, state in sorted(states.items()):
            if state.status == manifest.STATUS_DELETED or self.source_errors:
                continue
            info["deletions"] += 1
            rows.append(_candidate(IdentityGroup(ident, []), state, deleted=True))
