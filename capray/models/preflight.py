"""Can this config's models load here? Answered on the driver in a second, before any Ray process starts.

Without it an offline cluster starts Ray, waits for actors and ends in nested tracebacks about
weights nobody could download. Each failure is one line: the model, where capray looked, and the
command that fixes it. Checks only what loading needs, without loading anything:

- `model.sd`: 'tiny' (built locally) passes; a local directory must be SD-format; a hub id must be
  in the Hugging Face cache, or the hub must be reachable (and HF_HUB_OFFLINE unset).
- `model.style_weights`: 'random' passes; a state-dict path must exist; 'imagenet' must be in the
  torch cache, or torchvision's download host reachable.
"""

from __future__ import annotations

from pathlib import Path

from capray.config import REAL_SD_MODEL, TINY_MODEL, ModelConfig
from capray.models import cache


class PreflightError(ValueError):
    """A model that cannot load here; the message is the one line the user sees."""


def fetch_command(cfg: ModelConfig) -> str:
    """The command that puts this config's weights in the caches."""
    local = cfg.sd == TINY_MODEL or cache.looks_like_path(cfg.sd)
    sd = "" if local or (cfg.sd == REAL_SD_MODEL and not cfg.revision) else f" --sd {cfg.sd}"
    revision = f" --revision {cfg.revision}" if cfg.revision and sd else ""
    style = "" if cfg.style_network == "vgg19" else f" --style {cfg.style_network}"
    return f"capray models fetch{sd}{revision}{style}"


def check_sd(cfg: ModelConfig) -> None:
    sd = cfg.sd
    if sd == TINY_MODEL:
        return
    if cache.looks_like_path(sd):
        root = Path(sd).expanduser()
        problems = cache.sd_directory_problems(root)
        if problems:
            raise PreflightError(
                f"model.sd {sd!r} is not an SD-format directory ({', '.join(problems)}); give a directory "
                f"holding {', '.join(cache.SD_PARTS)}, a hub id (`capray models fetch --sd ID` caches it), or 'tiny'")
        return
    hub_cache = cache.hf_hub_cache()
    snapshot = cache.cached_snapshot(sd, cfg.revision, hub_cache)
    if snapshot is not None and not cache.sd_directory_problems(snapshot):
        return
    where = f"not in the Hugging Face cache {hub_cache}" if snapshot is None else (
        f"incomplete in the Hugging Face cache ({', '.join(cache.sd_directory_problems(snapshot))})")
    if cache.hub_offline():
        why = "and HF_HUB_OFFLINE is set"
    else:
        url = f"{cache.hub_endpoint()}/api/models/{sd}" + (f"/revision/{cfg.revision}" if cfg.revision else "")
        probe = cache.reachable(url)
        if probe.ok:
            return  # from_pretrained downloads it on first load
        why = f"and the hub is unreachable ({probe.reason})"
    raise PreflightError(f"model.sd {sd!r} is {where} {why}; run `{fetch_command(cfg)}` where the hub is "
                         "reachable (or set HF_HOME to a filled cache), or point --model at an SD-format directory")


def check_style(cfg: ModelConfig) -> None:
    weights = cfg.style_weights
    if weights == "random":
        return
    if weights != "imagenet":
        if not Path(weights).expanduser().is_file():
            raise PreflightError(f"model.style_weights {weights!r}: no such state-dict file; give a "
                                 "torchvision state-dict path, or 'imagenet' (`capray models fetch` caches it)")
        return
    path = cache.imagenet_file(cfg.style_network)
    if path.is_file():
        return
    probe = cache.reachable(cache.imagenet_weights(cfg.style_network).url)
    if probe.ok:
        return  # torchvision downloads it on first load
    raise PreflightError(
        f"ImageNet weights for the style network {cfg.style_network} are not in the torch cache ({path}) and "
        f"cannot be downloaded ({probe.reason}); run `{fetch_command(cfg)}` where the network is reachable "
        "(or set TORCH_HOME to a filled cache), or give model.style_weights a state-dict path")


def preflight(cfg: ModelConfig) -> None:
    """Raise `PreflightError` (one line) when the SD model or the style network's weights cannot load here."""
    check_sd(cfg)
    check_style(cfg)
