"""The config options every front door shares, and the one precedence rule that turns them into a config."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capray.config import CaprayConfig


def add_config_options(parser: argparse.ArgumentParser, *, set_example: str = "attack.eps=0.03") -> None:
    """The options every front door shares: where the config comes from, the model, the cluster."""
    parser.add_argument("--config", help="YAML/JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config value, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--model", help="SD model: hub id, local SD-format directory, or 'tiny' (sets model.sd; "
                                         "default: SD 2.1 base)")
    parser.add_argument("--preset", type=_preset,
                        help="'smoke': the tiny random model and tiny budgets for a CPU; 'paper': the paper's "
                             "settings (§5); 'robust': attack.robust on; several join with ',' (smoke,robust)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def _preset(value: str) -> str:
    from capray.config import preset_names

    try:
        return ",".join(preset_names(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
