"""`capray models list`: what the local caches hold, and whether each entry loads offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capray.models import cache


@dataclass
class Entry:
    kind: str  # "sd" (hub snapshot, usable as model.sd) or "style" (ImageNet weights for model.style_network)
    name: str  # hub id, or the style network
    revision: str  # refs (e.g. 'main') or the commit; '' for style weights
    path: Path
    size_bytes: int
    problems: list[str]

    @property
    def usable(self) -> bool:
        return not self.problems


def hub_entries(hub_cache: Path) -> list[Entry]:
    """Every model snapshot in the hub cache, checked as an SD-format directory."""
    if not hub_cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    entries = []
    for repo in scan_cache_dir(hub_cache).repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            entries.append(Entry("sd", repo.repo_id, ",".join(sorted(rev.refs)) or rev.commit_hash[:12],
                                 rev.snapshot_path, rev.size_on_disk, cache.sd_directory_problems(rev.snapshot_path)))
    return sorted(entries, key=lambda e: (e.name, e.revision))


def style_entries(checkpoints: Path) -> list[Entry]:
    """The ImageNet weights of each style network capray knows, present or not."""
    entries = []
    for network in cache.IMAGENET_WEIGHTS:
        path = cache.imagenet_file(network, checkpoints)
        present = path.is_file()
        entries.append(Entry("style", network, "", path, path.stat().st_size if present else 0,
                             [] if present else ["not downloaded"]))
    return entries


def format_entries(entries: list[Entry]) -> list[str]:
    lines = []
    for e in entries:
        label = f"{e.name}@{e.revision}" if e.revision else e.name
        status = "usable offline" if e.usable else "NOT usable: " + ", ".join(e.problems)
        size = f"{e.size_bytes / 1e9:.2f} GB" if e.size_bytes else "-"
        lines.append(f"{e.kind:<5} {label:<48} {size:>9}  {status}  {e.path}")
    return lines
