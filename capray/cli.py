"""`capray protect | evaluate | serve | models | demo` — argument parsing and dispatch only.

Each front door owns its options (`add_arguments`) and its work (`run`) in its own package; this
module just wires them up, importing them lazily so `capray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from capray.config import CaprayConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT_FAILED = 0, 1, 2, 3  # 3: see `capray protect`'s exit codes

COMMANDS = {
    "protect": ("capray.batch.command", "protect photos of many identities on Ray (the main job)"),
    "evaluate": ("capray.evaluate.command", "play the attacker: DreamBooth on protected photos, metrics, report"),
    "serve": ("capray.serve.command", "run the online protection endpoint (Ray Serve)"),
    "models": ("capray.models.command", "fetch the real model weights for offline use, list the cache, "
                                        "build the tiny random SD model"),
    "manifest": ("capray.batch.manifest_command", "manifest maintenance: `capray manifest compact OUT`"),
    "demo": ("capray.batch.demo", "protect the bundled sample identities end to end and summarise"),
}


def add_config_options(parser: argparse.ArgumentParser, *, set_example: str = "attack.eps=0.03") -> None:
    """The options every front door shares: where the config comes from, the model, the cluster."""
    parser.add_argument("--config", help="YAML/JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config value, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--model", help="SD model: hub id, local SD-format directory, or 'tiny' (sets model.sd; "
                                         "default: SD 2.1 base)")
    parser.add_argument("--preset", choices=["smoke", "paper"],
                        help="'smoke': the tiny random model and tiny budgets for a CPU; 'paper': the paper's "
                             "settings (§5)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def overrides_from_args(args: argparse.Namespace, flags: dict | None = None) -> dict:
    """`--set` values with the command's dedicated flags (`--model` and `flags`) merged over them.

    The one precedence rule of every front door: preset → config file → `--set` → dedicated flags
    (later wins). `load_config` applies the first three in that order; this puts the flags last.
    """
    from capray.config import deep_merge, parse_set

    dedicated = {"model": {"sd": args.model}} if getattr(args, "model", None) else {}
    return deep_merge(parse_set(args.set), deep_merge(dedicated, flags or {}))


def config_from_args(args: argparse.Namespace, flags: dict | None = None, *,
                     default_preset: Callable[[CaprayConfig], str | None] | None = None) -> CaprayConfig:
    """The effective config of a front door (see `overrides_from_args` for the precedence rule).

    `default_preset` picks a preset from the config as it stands without one, for commands whose
    sensible budget depends on the model (evaluate: smoke for the tiny model, paper otherwise).
    """
    from capray.config import load_config

    overrides = overrides_from_args(args, flags)
    preset = args.preset
    if preset is None and default_preset is not None:
        preset = default_preset(load_config(args.config, overrides=overrides))
    return load_config(args.config, preset=preset, overrides=overrides)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input or setup cannot work": one line, exit 2, no traceback."""
    from pydantic import ValidationError

    return ValueError, ValidationError, OSError


def describe(exc: BaseException) -> str:
    """An error as one line (pydantic's multi-line report becomes `key: problem; …`)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def report(command: str, args: argparse.Namespace, message: str, exc: BaseException | None = None) -> None:
    """One line on stderr, `capray COMMAND: message`; the traceback before it with --debug."""
    if exc is not None and getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"capray {command}: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capray", description="Group-aware photo protection against unauthorized personalization (CAP), on Ray.")
    debug_help = "show tracebacks (by default an expected error is one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch; whatever a command lets escape is still one line (exit 2 expected, 1 otherwise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])  # --debug anywhere, nested commands too
    args.debug = "--debug" in argv
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except expected_errors() as exc:
        report(args.command, args, describe(exc), exc)
        return EXIT_USAGE
    except Exception as exc:
        report(args.command, args,
               f"{type(exc).__name__}: {describe(exc)} (rerun with --debug for the traceback)", exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
