"""`capray protect | evaluate | serve | models | demo` — argument parsing and dispatch only.

Each front door owns its options (`add_arguments`) and its work (`run`) in its own package; this
module just wires them up, importing them lazily so `capray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "protect": ("capray.batch.command", "protect photos of many identities on Ray (the main job)"),
    "evaluate": ("capray.evaluate.command", "play the attacker: DreamBooth on protected photos, metrics, report"),
    "serve": ("capray.serve.command", "run the online protection endpoint (Ray Serve)"),
    "models": ("capray.models.command", "model utilities (build the tiny random SD model)"),
    "manifest": ("capray.batch.manifest_command", "manifest maintenance: `capray manifest compact OUT`"),
    "demo": ("capray.batch.demo", "protect the bundled sample identities end to end and summarise"),
}


def add_config_options(parser: argparse.ArgumentParser, *, set_example: str = "attack.eps=0.03") -> None:
    """The options every front door shares: where the config comes from, the model, the cluster."""
    parser.add_argument("--config", help="YAML/JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config value, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--model", help="SD model: hub id, local SD-format directory, or 'tiny' (sets model.sd)")
    parser.add_argument("--preset", choices=["smoke", "paper"],
                        help="'smoke': tiny budgets for a CPU; 'paper': the paper's settings (§5)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def model_flag(args: argparse.Namespace) -> dict:
    """The config override that --model stands for."""
    return {"model": {"sd": args.model}} if args.model else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capray", description="Group-aware photo protection against unauthorized personalization (CAP), on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
