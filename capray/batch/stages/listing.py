"""Stage 1, list: where the job's identities come from, streamed into Ray Data (the driver lists nothing).

- Folder input: `IdentityFolders`, a Ray Data datasource with one read task that lists ROOT page by
  page and yields each page of identity names as a block.
- Catalog input (a Parquet/CSV/JSON Lines file of `identity, uri` rows): one task per catalog file
  scans it in record batches and yields its identity groups; the files must be sorted by identity
  (checked, see `capray/io/discover.py`).

A platform that already has its identities as a Ray Dataset skips this stage and hands the Dataset
to the processor (`capray.batch.build_processor`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from capray.batch.rows import CANDIDATE_SCHEMA
from capray.io.discover import IdentityGroup, iter_catalog_groups, iter_identity_names
from capray.io.storage import get_fs

GROUPS_PER_BLOCK = 1000


def _candidate_table(groups: list[IdentityGroup]) -> pa.Table:
    rows = [{"identity": g.identity, "uris": g.uris, "sizes": [p.size for p in g.photos],
             "versions": [p.version for p in g.photos]} for g in groups]
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


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
    """The Ray Dataset of candidate identities (name, and photos for catalogs), built lazily."""
    import ray

    so = cfg.batch.storage_options
    if plan.kind == "folder":
        return ray.data.read_datasource(_folder_datasource(plan.input, so, tally), override_num_blocks=1)
    files = ray.data.from_items([{"file": f} for f in plan.catalog_files],
                                override_num_blocks=len(plan.catalog_files))
    return files.map_batches(catalog_candidates, batch_size=1, batch_format="pyarrow",
                             num_cpus=cfg.batch.cpus_per_io_task, fn_kwargs={"storage_options": so, "tally": tally})


def catalog_candidates(batch: pa.Table, storage_options: dict[str, Any], tally):
    """One catalog file → blocks of its identity groups; an unusable file is reported, not half-used."""
    from capray.batch.tally import report

    for uri in batch.column("file").to_pylist():
        fs, path = get_fs(uri, storage_options)
        groups: list[IdentityGroup] = []
        blocks = 0
        try:
            for group in iter_catalog_groups(fs, path):
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
