"""Logging: one setup from the CLI's --log-level/--log-format, handed to Ray's workers too (no Ray started)."""

from __future__ import annotations

import json
import logging

import pytest

from capray import logs


@pytest.fixture(autouse=True)
def restore_logging():
    root, ours = logging.getLogger(), logging.getLogger("capray")
    saved = (list(root.handlers), root.level, ours.level, logs.current_settings())
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])
    logs._settings.update(level=saved[3][0], fmt=saved[3][1])


def test_json_lines_carry_time_level_logger_message_and_the_traceback(capsys):
    logs.configure_logging("INFO", "json")
    log = logging.getLogger("capray.test")
    log.debug("not shown")
    log.info("hello %s", "world")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "capray.test", "hello world")
    assert first["time"].endswith("+00:00") and "T" in first["time"] and "exc_info" not in first
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exc_info"]


def test_the_level_is_capray_s_and_other_libraries_keep_to_warnings(capsys):
    logs.configure_logging("DEBUG", "text")
    logs.configure_logging("INFO", "text")  # a second call replaces the first handler, no duplicate lines
    logging.getLogger("capray.x").info("ours")
    logging.getLogger("somelib").info("theirs")
    logging.getLogger("somelib").warning("their warning")
    err = capsys.readouterr().err
    assert err.count("ours") == 1 and "theirs" not in err and "their warning" in err
    assert " INFO capray.x: ours" in err


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="log level"):
        logs.configure_logging("LOUD")
    with pytest.raises(ValueError, match="log format"):
        logs.configure_logging("INFO", "xml")


def test_ray_gets_the_same_level_and_encoding():
    import ray

    logs.configure_logging("WARNING", "json")
    cfg = logs.ray_logging_config()
    assert isinstance(cfg, ray.LoggingConfig) and (cfg.encoding, cfg.log_level) == ("JSON", "WARNING")
    assert logs.ray_logging_config("DEBUG", "text").encoding == "TEXT"


def test_the_cli_flags_stand_anywhere_and_default_from_the_environment(monkeypatch):
    from capray.cli import build_parser, split_logging_options

    options, rest = split_logging_options(["--log-format", "json", "models", "list", "--log-level", "debug",
                                           "--cache", "DIR"])
    assert (options.log_level, options.log_format, rest) == ("DEBUG", "json", ["models", "list", "--cache", "DIR"])
    monkeypatch.setenv("CAPRAY_LOG_LEVEL", "warning")
    monkeypatch.setenv("CAPRAY_LOG_FORMAT", "JSON")
    options, _ = split_logging_options(["models", "list"])
    assert (options.log_level, options.log_format) == ("WARNING", "json")
    with pytest.raises(SystemExit):
        split_logging_options(["--log-level", "LOUD", "models", "list"])
    assert "--log-format" in build_parser().format_help()  # documented in `capray --help`


def test_a_bad_environment_value_is_a_usage_error(monkeypatch, capsys):
    from capray.cli import main

    monkeypatch.setenv("CAPRAY_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as exit_:
        main(["models", "list"])
    assert exit_.value.code == 2 and "CAPRAY_LOG_LEVEL" in capsys.readouterr().err


def test_connect_ray_sends_worker_logs_to_the_driver_and_keeps_the_driver_s_handlers(monkeypatch):
    import ray

    from capray.cluster import connect_ray

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        logging.getLogger().addHandler(logging.StreamHandler())  # what ray.init's logging_config does
        logging.getLogger().setLevel(logging.DEBUG)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    logs.configure_logging("ERROR", "json")
    before = (list(logging.getLogger().handlers), logging.getLogger().level)
    assert connect_ray(None) is True
    assert seen["log_to_driver"] is True and seen["address"] == "local"
    assert (seen["logging_config"].encoding, seen["logging_config"].log_level) == ("JSON", "ERROR")
    assert (list(logging.getLogger().handlers), logging.getLogger().level) == before
