"""`capray evaluate --clean DIR --protected DIR[,DIR…] --out DIR [--model ID_OR_DIR] [--preset smoke|paper]`."""

from __future__ import annotations

import argparse

import sys

from capray.config import TINY_MODEL, deep_merge, load_config, parse_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", required=True, help="clean photos: DIR/<identity>/<photos>")
    parser.add_argument("--protected", default="", help="comma-separated `capray protect` output folders")
    parser.add_argument("--out", required=True, help="report folder (must not overlap the inputs)")
    from capray.cli import add_config_options

    add_config_options(parser, set_example="evaluate.train_steps=500")  # no --preset: smoke for 'tiny', else paper
    parser.add_argument("--transform", action="append", default=[], metavar="SPEC",
                        help="robustness transform before training: jpeg:75, blur:1.5, resize:0.5 (repeatable)")
    parser.add_argument("--lora", action="store_true", help="the attacker trains LoRA adapters instead of full weights")
    parser.add_argument("--identity", action="append", default=[], help="evaluate only these identities")
    parser.add_argument("--no-ray", action="store_true", help="run identities in this process, one after another")


def build_config(args: argparse.Namespace):
    overrides = parse_set(args.set)
    from capray.cli import model_flag

    extra: dict = model_flag(args)
    if args.transform:
        extra["evaluate"] = {"transforms": list(args.transform)}
    if args.lora:
        extra = deep_merge(extra, {"evaluate": {"lora": True}})
    merged = deep_merge(extra, overrides)
    preset = args.preset
    if preset is None:  # a real model gets the paper's protocol; the tiny one a few steps
        probe = load_config(args.config, overrides=merged)
        preset = "smoke" if probe.model.sd == TINY_MODEL else "paper"
    cfg = load_config(args.config, preset=preset, overrides=merged)
    from capray.models.sd import preflight

    preflight(cfg.model)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every photo set of every identity was evaluated, 1 when some failed, 2 for unusable input."""
    from pydantic import ValidationError

    from capray.evaluate.pipeline import evaluate

    try:
        cfg = build_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"capray evaluate: configuration error: {exc}", file=sys.stderr)
        return 2
    protected = [p for p in args.protected.split(",") if p.strip()]
    try:
        result = evaluate(args.clean, protected, args.out, cfg, use_ray=not args.no_ray,
                          identities=args.identity or None, address=args.address)
    except (OSError, ValueError) as exc:  # missing folder, overlap, unreachable or forbidden storage
        print(f"capray evaluate: {exc}", file=sys.stderr)
        return 2
    incomplete = [f"{r['identity']} ({r['status']})" for r in result["identities"] if r["status"] != "ok"]
    if incomplete:
        print(f"capray evaluate: not fully evaluated (see the report): {', '.join(incomplete)}", file=sys.stderr)
    return 1 if incomplete else 0
