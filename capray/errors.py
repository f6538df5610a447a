"""How a command tells its user that something cannot work: one line, `capray COMMAND: message`.

Shared by every front door and by `capray.cli`'s last-resort handler, so an expected error reads the
same wherever it is caught; the traceback is shown only with `--debug`.
"""

from __future__ import annotations

import argparse
import sys
import traceback


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
    """One line on stderr, `capray COMMAND: message`; the traceback before it with --debug.

    This is the command's own output, not a log record: it stays a plain line whatever `--log-format`.
    """
    if exc is not None and getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"capray {command}: {message}", file=sys.stderr)
