"""`capray protect | evaluate | serve | models | demo` — argument parsing and dispatch only.

Each front door owns its options (`add_arguments`) and its work (`run`) in its own package; this
module just wires them up, importing them lazily so `capray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from capray.errors import describe, expected_errors, report
from capray.exit_codes import EXIT_FAILED, EXIT_USAGE
from capray.logs import FORMATS, LEVELS, configure_logging

COMMANDS = {
    "protect": ("capray.batch.command", "protect photos of many identities on Ray (the main job)"),
    "evaluate": ("capray.evaluate.command", "play the attacker: DreamBooth on protected photos, metrics, report"),
    "serve": ("capray.serve.command", "run the online protection endpoint (Ray Serve)"),
    "models": ("capray.models.command", "fetch the real model weights for offline use, list the cache, "
                                        "build the tiny random SD model"),
    "manifest": ("capray.batch.manifest_command", "manifest maintenance: `capray manifest compact OUT`"),
    "demo": ("capray.batch.demo", "protect the bundled sample identities end to end and summarise"),
    "submit": ("capray.client.command", "send one person's photos to a capray endpoint and save the protected ones"),
}


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """How log records look (`capray.logs`); the environment sets them for a container without editing its args."""
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, metavar="{DEBUG,INFO,WARNING,ERROR}",
                        default=os.environ.get("CAPRAY_LOG_LEVEL", "INFO").upper(),
                        help="capray's log records at this level and above (default INFO, env CAPRAY_LOG_LEVEL)")
    parser.add_argument("--log-format", type=str.lower, choices=FORMATS,
                        default=os.environ.get("CAPRAY_LOG_FORMAT", "text").lower(),
                        help="log records as text or one JSON object per line, workers' too (default text, "
                             "env CAPRAY_LOG_FORMAT)")


def split_logging_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(--log-level/--log-format, the rest of argv): like --debug, they may stand anywhere, nested commands too."""
    pre = argparse.ArgumentParser(prog="capray", add_help=False, allow_abbrev=False)
    add_logging_options(pre)
    return pre.parse_known_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capray", description="Group-aware photo protection against unauthorized personalization (CAP), on Ray.")
    debug_help = "show tracebacks (by default an expected error is one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    add_logging_options(parser)  # for --help: main() takes them out of argv wherever they stand
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
    logging_options, argv = split_logging_options(argv)
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])  # --debug anywhere, nested commands too
    args.debug = "--debug" in argv
    args.log_level, args.log_format = logging_options.log_level, logging_options.log_format
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:  # a bad $CAPRAY_LOG_LEVEL/$CAPRAY_LOG_FORMAT (argparse checks the flags)
        parser.error(f"{exc} ($CAPRAY_LOG_LEVEL / $CAPRAY_LOG_FORMAT)")
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
