"""`capray models tiny PATH`: write the tiny random SD-format model directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random SD-format model directory")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=1234)


def run(args: argparse.Namespace) -> int:
    from capray.models.tiny import build_tiny_model

    path = build_tiny_model(args.path, seed=args.seed)
    print(f"tiny SD-format model written to {path}")
    return 0
