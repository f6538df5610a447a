"""`capray protect INPUT OUTPUT`: protect every identity under INPUT on Ray, resumably.

Exit codes (docs/bulk.md, "Exit codes"): 0 nothing left that a rerun could fix (every identity ok, or
failed for its input: see OUT/manifest/); 1 some identities failed transiently or did not finish (a
rerun retries them); 2 usage or configuration error (nothing was written), or OUTPUT's lease is held
by another live job; 3 only with `batch.fail_on_input_errors`: identities failed for their input and
nothing else is wrong.
"""

from __future__ import annotations

import _thread
import argparse
import os
import shutil
import sys

from capray.exit_codes import EXIT_FAILED, EXIT_INPUT_FAILED, EXIT_OK, EXIT_USAGE  # noqa: F401  (re-exported)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="folder/prefix ROOT/<identity>/<photos>, or a catalog file "
                                      "(.parquet/.csv/.jsonl with columns identity, uri); local or s3://")
    parser.add_argument("output", help="output folder/prefix (must not overlap the input); rerun to resume")
    from capray.config_args import add_config_options

    add_config_options(parser)
    parser.add_argument("--method", choices=["fsmg", "aspl", "simac"], help="baseline attack")
    parser.add_argument("--cap", action=argparse.BooleanOptionalAction, default=None,
                        help="add CAP's cross-image consistency loss (default: on)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--retry-quarantined", action="store_true",
                        help="retry identities quarantined after batch.quarantine_after transient failures in a row")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over OUTPUT's lease even if another job seems to hold it (only when "
                             "you know that job is dead)")


def build_config(args: argparse.Namespace):
    from capray.config_args import config_from_args

    flags: dict = {}
    if args.method:
        flags["attack"] = {"method": args.method}
    if args.cap is not None:
        flags["cap"] = {"enabled": args.cap}
    if getattr(args, "retry_quarantined", False):
        flags["batch"] = {"retry_quarantined": True}
    return config_from_args(args, flags)


def protect(input_uri: str, output_uri: str, cfg, *, address: str | None = None, show_progress: bool = True,
            force_unlock: bool = False, **job_kwargs):
    """Take OUTPUT's lease, plan, write run.json, run the job; raises `UsageError` (or `LeaseHeld`)
    before doing any work, and `LeaseLost` when another job took OUTPUT over mid-run.

    `make_plan` runs the models' preflight, so a model that cannot load stops here before Ray starts.
    """
    from capray.batch import lease
    from capray.batch.pipeline import run_job
    from capray.batch.plan import make_plan, write_run_file
    from capray.batch.resources import embedded_cpu_fallback
    from capray.cluster import connect_ray
    from capray.io.storage import normalize_uri

    output_uri = normalize_uri(output_uri)
    created_dir = "://" not in output_uri and not os.path.exists(output_uri)
    held = lease.acquire(output_uri, cfg.batch.lease_ttl_s, cfg.batch.storage_options, force=force_unlock,
                         on_lost=_thread.interrupt_main)  # the loop below then sees KeyboardInterrupt
    started = False
    try:
        try:
            plan = make_plan(input_uri, output_uri, cfg)  # after the lease: it cleans temp files in OUTPUT
            plan.fence = held.fence()
        except Exception:
            held.release()
            if created_dir:  # a refused run writes nothing
                shutil.rmtree(output_uri, ignore_errors=True)
            raise
        cfg = embedded_cpu_fallback(cfg, address)  # after the preflight: a refused run says one line
        started = connect_ray(address)  # listing and the done-check run on the cluster too
        write_run_file(plan, cfg)
        return run_job(plan, cfg, show_progress=show_progress, **job_kwargs)
    except KeyboardInterrupt:
        if held.lost:
            raise lease.LeaseLost(held.lost) from None
        raise
    finally:
        held.release()
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    from capray.batch.lease import LeaseHeld
    from capray.batch.plan import UsageError
    from capray.errors import describe, expected_errors, report

    try:
        cfg = build_config(args)
    except expected_errors() as exc:
        report("protect", args, f"configuration error: {describe(exc)}", exc)
        return EXIT_USAGE
    try:
        summary = protect(args.input, args.output, cfg, address=args.address, show_progress=not args.quiet,
                          force_unlock=args.force_unlock)
    except (UsageError, LeaseHeld) as exc:
        report("protect", args, describe(exc), exc)
        return EXIT_USAGE
    except Exception as exc:  # e.g. the actors cannot load the model: committed identities stay committed
        report("protect", args, f"the job stopped: {type(exc).__name__}: {describe(exc)}; identities already "
               "committed are kept, rerun with the same OUTPUT to resume", exc)
        return EXIT_FAILED
    for error in summary.source_errors:
        print(f"capray protect: input not fully read: {error}", file=sys.stderr)
    print(f"capray protect: {summary.ok} ok, {summary.failed} failed ({summary.failed_input} for their input), "
          f"{summary.skipped} already ok, {summary.skipped_input} failed before for unchanged input, "
          f"{summary.quarantined} quarantined, {summary.deleted} deleted, "
          f"{summary.unfinished} unfinished of {summary.total} identities; manifest in "
          f"{summary.output}/manifest/", file=sys.stderr)
    if summary.quarantined:
        print(f"capray protect: {summary.quarantined} identities failed transiently in "
              f"{cfg.batch.quarantine_after} runs in a row and were skipped; rerun with --retry-quarantined "
              "to retry them", file=sys.stderr)
    if summary.stopped:
        print(f"capray protect: stopped early ({summary.stopped}); the next run continues where this one "
              "stopped", file=sys.stderr)
    for note in cfg.model.notes:
        print(f"capray protect: {note}", file=sys.stderr)
    return summary.exit_code
