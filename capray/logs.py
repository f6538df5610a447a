"""One logging setup for every capray process: capray's modules log, the CLI decides how it looks.

Modules call `logging.getLogger(__name__)` and never configure anything themselves (they may be
imported by someone else's program). `capray` (the CLI) calls `configure_logging` once, from
`--log-level` / `--log-format`, and `capray.cluster.connect_ray` hands the same settings to Ray
(`ray_logging_config`), so the workers' records come out at the same level and in the same encoding.

`--log-level` applies to capray's own loggers; other libraries (torch, diffusers, httpx…) keep to
WARNING and above unless DEBUG asks for everything. A command's own output (its summary line, its
`capray CMD: message` error line, `capray models list`) is not logging: it is printed as it always was.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_settings = {"level": "INFO", "fmt": "text"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and exc_info when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, so redirected or captured stderr
    (contextlib.redirect_stderr, pytest) gets the records, like the plain lines printed beside them."""

    capray = True  # marks the handler `configure_logging` owns (and replaces on a second call)

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _check(level: str, fmt: str) -> tuple[str, str]:
    level, fmt = level.upper(), fmt.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return level, fmt


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send log records to stderr as `fmt` ("text" or "json"): capray's at `level`, others' at WARNING+.

    Idempotent: a second call replaces the handler of the first, and leaves other handlers (pytest's
    capture, an embedding program's) alone.
    """
    level, fmt = _check(level, fmt)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "capray", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level == "DEBUG" else max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("capray").setLevel(level)
    _settings.update(level=level, fmt=fmt)


def current_settings() -> tuple[str, str]:
    """(level, fmt) of the last `configure_logging` call; INFO/text when the CLI did not configure any."""
    return _settings["level"], _settings["fmt"]


def ray_logging_config(level: str | None = None, fmt: str | None = None):
    """The `ray.LoggingConfig` for the workers of a job (default: `current_settings()`).

    Ray formats the workers' records itself (its JSON keys: asctime, levelname, message, name, plus
    job/worker/node ids), so a JSON line from a worker is a JSON object too, with Ray's field names.
    """
    import ray

    level, fmt = _check(level or _settings["level"], fmt or _settings["fmt"])
    return ray.LoggingConfig(encoding="JSON" if fmt == "json" else "TEXT", log_level=level,
                             additional_log_standard_attrs=["name"])
