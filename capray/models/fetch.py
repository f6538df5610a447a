"""`capray models fetch`: put the real weights where an offline cluster loads them, and prove they load.

SD 2.1 base goes into the Hugging Face hub cache (only the parts capray loads, full-precision
safetensors), the style network's ImageNet weights into the torch cache. `cache_root` (a shared
volume) holds both as `ROOT/huggingface/hub` and `ROOT/torch/hub/checkpoints`, i.e. what pods see
with HF_HOME=ROOT/huggingface and TORCH_HOME=ROOT/torch. Already cached parts are not downloaded
again; without network a missing part fails at once, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capray.config import REAL_SD_MODEL, ModelConfig
from capray.models import cache


class FetchError(RuntimeError):
    """Fetching cannot work here; the message is the one line the user sees."""


@dataclass
class CacheDirs:
    hub: Path
    checkpoints: Path

    @classmethod
    def at(cls, root: str | Path | None) -> CacheDirs:
        """The caches under a shared root, or the ones this environment uses."""
        if root is None:
            return cls(cache.hf_hub_cache(), cache.torch_checkpoints())
        root = Path(root).expanduser().resolve()
        return cls(root / "huggingface" / "hub", root / "torch" / "hub" / "checkpoints")


@dataclass
class Fetched:
    sd_snapshot: Path
    style_file: Path
    downloaded: list[str]


def _require_network(url: str, what: str) -> None:
    probe = cache.reachable(url)
    if not probe.ok:
        raise FetchError(f"{what} is not cached and {probe.reason}; nothing was downloaded. Run "
                         "`capray models fetch --cache DIR` on a machine with internet access and copy or mount "
                         "DIR here (HF_HOME=DIR/huggingface, TORCH_HOME=DIR/torch)")


def fetch(sd: str = REAL_SD_MODEL, *, revision: str | None = None, style: str = "vgg19",
          cache_root: str | Path | None = None, verify: bool = True,
          progress: Callable[[str], None] = print) -> Fetched:
    """Download what is missing, then load both models once from their cached files."""
    if cache.looks_like_path(sd):
        raise FetchError(f"--sd takes a hub id (e.g. {REAL_SD_MODEL}); {sd!r} is a local path, use it as --model")
    dirs = CacheDirs.at(cache_root)
    snapshot = cache.cached_snapshot(sd, revision, dirs.hub)
    need_sd = snapshot is None or bool(cache.sd_directory_problems(snapshot))
    style_file = cache.imagenet_file(style, dirs.checkpoints)
    need_style = not style_file.is_file()
    if need_sd:  # check every host first: fail before writing anything
        if cache.hub_offline():
            raise FetchError(f"{sd} is not cached in {dirs.hub} and HF_HUB_OFFLINE is set; unset it to download")
        _require_network(f"{cache.hub_endpoint()}/api/models/{sd}", sd)
    if need_style:
        _require_network(cache.imagenet_weights(style).url, f"{style} ImageNet weights")

    downloaded = []
    if need_sd:
        from huggingface_hub import snapshot_download

        progress(f"downloading {sd} ({', '.join(cache.SD_PARTS)}) into {dirs.hub} …")
        snapshot = Path(snapshot_download(sd, revision=revision, cache_dir=dirs.hub,
                                          allow_patterns=cache.SD_ALLOW_PATTERNS,
                                          ignore_patterns=cache.SD_IGNORE_PATTERNS))
        downloaded.append(sd)
    problems = cache.sd_directory_problems(snapshot)
    if problems:
        raise FetchError(f"{sd} at {snapshot} is not a complete SD-format model ({', '.join(problems)})")
    if need_style:
        import torch.hub

        progress(f"downloading {style} ImageNet weights into {dirs.checkpoints} …")
        dirs.checkpoints.mkdir(parents=True, exist_ok=True)
        torch.hub.load_state_dict_from_url(cache.imagenet_weights(style).url, model_dir=str(dirs.checkpoints),
                                           check_hash=True, map_location="cpu", weights_only=True)
        downloaded.append(style)
    if verify:
        verify_loads(snapshot, style, style_file)
    return Fetched(snapshot, style_file, downloaded)


def verify_loads(sd_dir: Path, style: str, style_file: Path) -> None:
    """Load both models from the cached files on the CPU, the way the workers will (no network)."""
    import torch

    from capray.models.sd import load_diffusion
    from capray.models.style import load_style_network

    load_diffusion(ModelConfig(sd=str(sd_dir), device="cpu", dtype="bf16"))
    load_style_network(ModelConfig(style_network=style, style_weights=str(style_file)), torch.device("cpu"))
