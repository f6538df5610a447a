"""`capray evaluate --clean DIR --protected DIR[,DIR…] --out DIR [--model ID_OR_DIR] [--preset smoke|paper]`."""

from __future__ import annotations

import argparse

from capray.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", required=True, help="clean photos: DIR/<identity>/<photos>")
    parser.add_argument("--protected", default="", help="comma-separated `capray protect` output folders")
    parser.add_argument("--out", required=True, help="report folder (must not overlap the inputs)")
    from capray.config_args import add_config_options

    add_config_options(parser, set_example="evaluate.train_steps=500")  # no --preset: smoke for 'tiny', else paper
    parser.add_argument("--transform", action="append", default=[], metavar="SPEC",
                        help="purification the attacker applies before training: jpeg:75, blur:1, median:3, "
                             "bilateral:25, resize:0.5, noise-denoise:8, tvm:0.1, upscale:20, diffpure:0.1, or "
                             "suite for the standard set (repeatable; docs/evaluation.md#purifications)")
    parser.add_argument("--lora", action="store_true", help="the attacker trains LoRA adapters instead of full weights")
    parser.add_argument("--identity", action="append", default=[], help="evaluate only these identities")
    parser.add_argument("--no-ray", action="store_true", help="run identities in this process, one after another")


def budget_for(cfg) -> str:
    """Without --preset: the tiny model gets a few steps (smoke), a real model the paper's protocol."""
    return "smoke" if cfg.model.is_tiny else "paper"


def build_config(args: argparse.Namespace):
    from capray.config_args import config_from_args

    flags: dict = {}
    if args.transform:
        flags["evaluate"] = {"transforms": list(args.transform)}
    if args.lora:
        flags.setdefault("evaluate", {})["lora"] = True
    cfg = config_from_args(args, flags, default_preset=budget_for)
    from capray.evaluate.transforms import parse_transforms

    parse_transforms(cfg.evaluate.transforms)  # a bad spec is a usage error before anything starts
    return cfg


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every photo set of every identity was evaluated, 1 when some failed, 2 for unusable input."""
    from capray.errors import describe, expected_errors, report
    from capray.evaluate.pipeline import evaluate
    from capray.models.preflight import PreflightError, preflight

    try:
        cfg = build_config(args)
    except expected_errors() as exc:
        report("evaluate", args, f"configuration error: {describe(exc)}", exc)
        return EXIT_USAGE
    try:
        preflight(cfg.model)  # on the driver, before evaluate starts Ray
    except PreflightError as exc:
        report("evaluate", args, describe(exc), exc)
        return EXIT_USAGE
    protected = [p for p in args.protected.split(",") if p.strip()]
    try:
        result = evaluate(args.clean, protected, args.out, cfg, use_ray=not args.no_ray,
                          identities=args.identity or None, address=args.address)
    except (OSError, ValueError) as exc:  # missing folder, overlap, unreachable or forbidden storage
        report("evaluate", args, describe(exc), exc)
        return EXIT_USAGE
    incomplete = [f"{r['identity']} ({r['status']})" for r in result["identities"] if r["status"] != "ok"]
    if incomplete:  # the command's own last line, not a log record
        report("evaluate", args, f"not fully evaluated (see the report): {', '.join(incomplete)}")
    return EXIT_FAILED if incomplete else EXIT_OK
