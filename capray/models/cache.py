"""Where model weights and capray's own built things live, and whether a place holds a copy that loads offline.

One definition of "a usable SD-format directory" and of the Hugging Face / torch cache locations,
shared by the preflight (before Ray starts), `capray models fetch` and `capray models list`.
Paths are read from the environment at call time (HF_HOME, HF_HUB_CACHE, TORCH_HOME), as a fresh
worker process would see them, so `--cache DIR` and tests can point elsewhere.

capray's own cache (the tiny model, class images) has one rule too: an explicit directory wins, else
`$CAPRAY_CACHE`, else `~/.cache/capray`. Workers of one cluster share it through the environment, so
the expensive things are built once per machine, under a file lock.
"""

from __future__ import annotations

import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# The parts `capray.models.sd.load_diffusion` loads, and the files each needs.
WEIGHTS_SUFFIXES = (".safetensors", ".bin")
SD_PARTS: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}
SD_WEIGHTED_PARTS = ("unet", "vae", "text_encoder")

# What `models fetch` downloads from a hub repo: the parts above, full-precision safetensors only.
SD_ALLOW_PATTERNS = ["model_index.json"] + [f"{part}/*.json" for part in SD_PARTS] + [
    "tokenizer/*.txt", *(f"{part}/*.safetensors" for part in SD_WEIGHTED_PARTS)]
SD_IGNORE_PATTERNS = ["*.fp16.*", "*non_ema*", "*.ckpt"]

# torchvision's ImageNet weights for each style network (capray.models.style loads the same ones).
IMAGENET_WEIGHTS = {"vgg19": "VGG19_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V2"}

_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache `from_pretrained` reads (huggingface_hub's own rule, at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def torch_checkpoints() -> Path:
    """Where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE: the cluster promised not to reach the hub, so neither does the preflight."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def looks_like_path(sd: str) -> bool:
    """model.sd names a local directory (rather than a hub id 'owner/name')."""
    return sd.startswith(("/", ".", "~")) or os.path.exists(sd)


def sd_directory_problems(root: Path) -> list[str]:
    """What keeps `root` from loading as an SD-format model ([] when it would load)."""
    if not root.is_dir():
        return ["no such directory"]
    problems = []
    for part, files in SD_PARTS.items():
        folder = root / part
        if not folder.is_dir():
            problems.append(f"{part}/ missing")
            continue
        problems += [f"{part}/{name} missing" for name in files if not (folder / name).is_file()]
        if part in SD_WEIGHTED_PARTS and not any(p.suffix in WEIGHTS_SUFFIXES for p in folder.iterdir()):
            problems.append(f"{part}/ has no weights")
    return problems


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The local snapshot of a hub repo when the cache holds one (no network), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir or hf_hub_cache(),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def imagenet_weights(network: str):
    """The torchvision weights enum for a style network's ImageNet weights."""
    import torchvision

    enum_name, member = IMAGENET_WEIGHTS[network].split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def imagenet_file(network: str, checkpoints: Path | None = None) -> Path:
    """Where torchvision looks for (and downloads) a style network's ImageNet weights."""
    url = imagenet_weights(network).url
    return (checkpoints or torch_checkpoints()) / url.rsplit("/", 1)[-1]


@dataclass
class Reachability:
    ok: bool
    reason: str = ""


def reachable(url: str, timeout: float = 5.0) -> Reachability:
    """One HEAD request: can this machine download from `url`'s host right now? (No retries.)"""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return Reachability(True)
    except urllib.error.HTTPError as exc:  # the host answered: the network is there
        if exc.code in (401, 403, 404):
            return Reachability(False, f"{url} answered {exc.code}")
        return Reachability(True)
    except (urllib.error.URLError, OSError) as exc:
        return Reachability(False, f"cannot reach {url.split('/')[2]}: {getattr(exc, 'reason', exc)}")


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """capray's own cache: the tiny model, class images, the default Serve job store."""
    return Path(explicit or os.environ.get("CAPRAY_CACHE") or Path.home() / ".cache" / "capray")


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive file lock: concurrent actors on one machine build a cached thing once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
