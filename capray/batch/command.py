"""`capray protect INPUT OUTPUT`: protect every identity under INPUT on Ray, resumably.

Exit codes (README "Exit codes"): 0 nothing left that a rerun could fix (every identity ok, or
failed for its input: see OUT/manifest/); 1 some identities failed transiently or did not finish (a
rerun retries them); 2 usage or configuration error (nothing was written); 3 only with
`batch.fail_on_input_errors`: identities failed for their input and nothing else is wrong.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT_FAILED = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="folder/prefix ROOT/<identity>/<photos>, or a manifest "
                                      "(.parquet/.csv/.jsonl with columns identity, uri); local or s3://")
    parser.add_argument("output", help="output folder/prefix (must not overlap the input); rerun to resume")
    from capray.cli import add_config_options

    add_config_options(parser)
    parser.add_argument("--method", choices=["fsmg", "aspl", "simac"], help="baseline attack")
    parser.add_argument("--cap", action=argparse.BooleanOptionalAction, default=None,
                        help="add CAP's cross-image consistency loss (default: on)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def build_config(args: argparse.Namespace):
    from capray.cli import model_flag
    from capray.config import deep_merge, load_config, parse_set

    overrides = parse_set(args.set)
    flags: dict = model_flag(args)
    if args.method:
        flags["attack"] = {"method": args.method}
    if args.cap is not None:
        flags["cap"] = {"enabled": args.cap}
    return load_config(args.config, preset=args.preset, overrides=deep_merge(overrides, flags))


def protect(input_uri: str, output_uri: str, cfg, *, address: str | None = None, show_progress: bool = True,
            **job_kwargs):
    """Plan, write run.json, run the job; raises `UsageError` before doing any work."""
    from capray.batch.pipeline import run_job
    from capray.batch.plan import make_plan, write_run_file
    from capray.cluster import connect_ray

    plan = make_plan(input_uri, output_uri, cfg)
    started = connect_ray(address)  # listing and the done-check run on the cluster too
    try:
        write_run_file(plan, cfg)
        return run_job(plan, cfg, show_progress=show_progress, **job_kwargs)
    finally:
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from capray.batch.plan import UsageError

    try:
        cfg = build_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"capray protect: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = protect(args.input, args.output, cfg, address=args.address, show_progress=not args.quiet)
    except UsageError as exc:
        print(f"capray protect: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # e.g. the actors cannot load the model: committed identities stay committed
        print(f"capray protect: the job stopped: {type(exc).__name__}: {exc}\n"
              "identities already committed are kept; rerun with the same OUTPUT to resume", file=sys.stderr)
        return EXIT_FAILED
    for error in summary.source_errors:
        print(f"capray protect: input not fully read: {error}", file=sys.stderr)
    print(f"capray protect: {summary.ok} ok, {summary.failed} failed ({summary.failed_input} for their input), "
          f"{summary.skipped} already ok, {summary.skipped_input} failed before for unchanged input, "
          f"{summary.unfinished} unfinished of {summary.total} identities; manifest in "
          f"{summary.output}/manifest/", file=sys.stderr)
    return summary.exit_code
