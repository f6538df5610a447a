"""`capray models fetch | list | tiny`: the real weights for offline use, what is cached, the tiny test model.

Exit codes: 0 done; 2 the weights cannot be fetched here (one line says why and what to do).
"""

from __future__ import annotations

import argparse
import logging

from capray.config import REAL_SD_MODEL
from capray.exit_codes import EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    cache_help = ("shared cache root (e.g. a mounted volume): ROOT/huggingface and ROOT/torch, i.e. "
                  "HF_HOME and TORCH_HOME of the pods; default: this environment's HF_HOME/TORCH_HOME")
    fetch = sub.add_parser("fetch", help="download SD 2.1 base and the style network's ImageNet weights into the "
                                         "caches, verify they load, print where they are")
    fetch.add_argument("--sd", default=REAL_SD_MODEL, help=f"hub id of the SD model (default: {REAL_SD_MODEL})")
    fetch.add_argument("--revision", help="hub revision (default: main)")
    fetch.add_argument("--style", choices=["vgg19", "resnet50"], default="vgg19", help="style network (default vgg19)")
    fetch.add_argument("--cache", help=cache_help)
    fetch.add_argument("--no-verify", action="store_true", help="skip loading the models once after the download")
    listing = sub.add_parser("list", help="show the cached models and whether each loads offline")
    listing.add_argument("--cache", help=cache_help)
    tiny = sub.add_parser("tiny", help="write a tiny random SD-format model directory (tests, demos: no protection)")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=1234)


def run_fetch(args: argparse.Namespace) -> int:
    from capray.errors import describe, report
    from capray.models.fetch import CacheDirs, FetchError, fetch

    try:
        got = fetch(args.sd, revision=args.revision, style=args.style, cache_root=args.cache,
                    verify=not args.no_verify, progress=lambda msg: log.info("%s", msg))
    except FetchError as exc:
        report("models fetch", args, describe(exc), exc)
        return EXIT_USAGE
    verified = "" if args.no_verify else " (loads)"
    print(f"{args.sd}: {got.sd_snapshot}{verified}")
    print(f"{args.style} ImageNet weights: {got.style_file}{verified}")
    if args.cache:
        dirs = CacheDirs.at(args.cache)
        print(f"use it with HF_HOME={dirs.hub.parent} TORCH_HOME={dirs.checkpoints.parent.parent}")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    from capray.models.fetch import CacheDirs
    from capray.models.inventory import format_entries, hub_entries, style_entries

    dirs = CacheDirs.at(args.cache)
    sd = hub_entries(dirs.hub)
    print(f"Hugging Face cache {dirs.hub}:")
    print("\n".join(format_entries(sd)) if sd else "  (no models)")
    print(f"torch cache {dirs.checkpoints}:")
    print("\n".join(format_entries(style_entries(dirs.checkpoints))))
    if not any(e.usable and e.name == REAL_SD_MODEL for e in sd):
        print(f"{REAL_SD_MODEL} (the default model) is not cached: run `capray models fetch`")
    return EXIT_OK


def run_tiny(args: argparse.Namespace) -> int:
    from capray.models.tiny import build_tiny_model

    path = build_tiny_model(args.path, seed=args.seed)
    print(f"tiny SD-format model written to {path} (a random network for tests and demos: not a protection)")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return {"fetch": run_fetch, "list": run_list, "tiny": run_tiny}[args.models_command](args)
