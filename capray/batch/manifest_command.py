"""`capray manifest compact OUT`: rewrite OUT/manifest/ as a few sorted files with one row per identity.

Every `capray protect` run folds its commit files into delta files at its end (`batch.compact_at_end`),
and merges everything once the deltas pass `batch.manifest_delta_ratio`; run this to merge now (one
row per identity in the folder), or to re-cut with another `batch.manifest_rows_per_file`. Safe to repeat. It takes
OUTPUT's lease as `capray protect` does, so it never runs beside a job still writing there.
Exit codes: 0 compacted (or nothing to compact); 1 the compaction stopped (every file is kept; rerun
it); 2 usage or configuration error, or OUTPUT's lease is held by another live job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    compact = sub.add_parser("compact", help="merge the commit files of OUT/manifest/, latest row per identity")
    compact.add_argument("output", help="the OUTPUT folder/prefix of a `capray protect` run")
    from capray.config_args import add_config_options

    add_config_options(compact, set_example="batch.manifest_rows_per_file=50000")
    compact.add_argument("--force-unlock", action="store_true",
                         help="take over OUTPUT's lease even if a job seems to hold it (only when you know "
                              "that job is dead)")


def run(args: argparse.Namespace) -> int:
    from capray.batch import lease
    from capray.batch.compact import compact
    from capray.cluster import connect_ray
    from capray.config_args import config_from_args
    from capray.errors import describe, expected_errors, report
    from capray.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from capray.io.storage import normalize_uri

    try:
        cfg = config_from_args(args)  # the one precedence rule, `--model` included
    except expected_errors() as exc:
        report("manifest", args, f"configuration error: {describe(exc)}", exc)
        return EXIT_USAGE
    output = normalize_uri(args.output)
    created_dir = "://" not in output and not os.path.exists(output)  # the lease would create it
    try:
        held = lease.acquire(output, cfg.batch.lease_ttl_s, cfg.batch.storage_options, force=args.force_unlock)
    except lease.LeaseHeld as exc:
        report("manifest", args, describe(exc), exc)
        return EXIT_USAGE
    started = False
    try:
        started = connect_ray(args.address)
        result = compact(output, cfg, full=True)
    except Exception as exc:  # the files read are deleted only after every row is in the new ones
        report("manifest", args, f"compaction stopped: {type(exc).__name__}: {describe(exc)}; no row was lost, "
               "run it again", exc)
        return EXIT_FAILED
    finally:
        held.release()
        if created_dir:
            shutil.rmtree(output, ignore_errors=True)
        if started:
            import ray

            ray.shutdown()
    print(f"capray manifest: {result.files_before} files → {result.files_after} ({result.rows} rows read)",
          file=sys.stderr)
    return EXIT_OK
