"""`capray manifest compact OUT`: rewrite OUT/manifest/ as a few files with one row per identity.

Every `capray protect` run compacts at its end (`batch.compact_at_end`); run this after a run that
was stopped early, or with a different `batch.manifest_rows_per_file`. Safe to repeat. Do not run it
while a `capray protect` on the same OUTPUT is still writing.
Exit codes: 0 compacted (or nothing to compact); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    compact = sub.add_parser("compact", help="merge the commit files of OUT/manifest/, latest row per identity")
    compact.add_argument("output", help="the OUTPUT folder/prefix of a `capray protect` run")
    from capray.cli import add_config_options

    add_config_options(compact, set_example="batch.manifest_rows_per_file=50000")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from capray.batch.command import EXIT_OK, EXIT_USAGE
    from capray.batch.compact import compact
    from capray.cluster import connect_ray
    from capray.config import load_config, parse_set
    from capray.io.storage import normalize_uri

    try:
        cfg = load_config(args.config, preset=args.preset, overrides=parse_set(args.set))
    except (ValidationError, ValueError, OSError) as exc:
        print(f"capray manifest: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = connect_ray(args.address)
    try:
        result = compact(normalize_uri(args.output), cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"capray manifest: {result.files_before} files → {result.files_after} ({result.rows} rows read)",
          file=sys.stderr)
    return EXIT_OK
