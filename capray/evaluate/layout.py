"""What to evaluate: identities in the clean folder and the photo sets ("sources") to attack for each.

Folders use the output layout `DIR/<identity>/<photo>`; a `capray protect` output folder also holds
`manifest/` and `run.json`, which are not identities. A protected folder's label comes from its
run.json (method and CAP on/off, e.g. "ASPL+CAP"), else from the folder's name. Each robustness
transform adds one more source per protected folder ("ASPL+CAP · JPEG q75").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from capray.evaluate.transforms import Transform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
NOT_IDENTITIES = {"manifest"}
METHOD_NAMES = {"fsmg": "FSMG", "aspl": "ASPL", "simac": "SimAC"}
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Source:
    """One photo set the attacker fine-tunes on."""

    key: str  # filesystem-safe, unique
    label: str  # shown in the report
    group: str  # the method table it belongs to ("clean" sources appear in every table)
    root: str
    protected: bool
    cap: bool | None = None
    transform: Transform | None = field(default=None)


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def list_identities(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in NOT_IDENTITIES
                  and not p.name.startswith("."))


def list_photos(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_photo(path: str | Path) -> np.ndarray:
    """Decode one photo to HxWx3 uint8 RGB, refusing decompression bombs."""
    with Image.open(path) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{path}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def protected_label(root: Path) -> tuple[str, str, bool | None]:
    """(label, method group, cap) from run.json if it names the method, else the folder name."""
    run = root / "run.json"
    if run.is_file():
        try:
            data = json.loads(run.read_text())
            conf = data.get("config", data) if isinstance(data, dict) else {}
            method = str(conf["attack"]["method"]).lower()
            cap = bool(conf.get("cap", {}).get("enabled", False))
            name = METHOD_NAMES.get(method, method)
            return (f"{name}+CAP" if cap else name), name, cap
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return root.name, root.name, None


def plan_sources(clean: Path, protected: list[Path], transforms: list[Transform]) -> list[Source]:
    sources = [Source("clean", "clean", "clean", str(clean), protected=False)]
    seen = {"clean"}
    for root in protected:
        label, group, cap = protected_label(root)
        for transform in [None, *transforms]:
            full = label if transform is None else f"{label} · {transform.label}"
            key = slugify(full if transform is None else f"{label}-{transform.slug}")
            base, n = key, 2
            while key in seen:  # two folders with the same method: keep both, distinct keys
                key, n = f"{base}-{n}", n + 1
            seen.add(key)
            sources.append(Source(key, full if key == base else f"{full} ({root.name})", group, str(root),
                                  protected=True, cap=cap, transform=transform))
    return sources


def check_output(out: Path, inputs: list[Path]) -> None:
    """The output folder must not overlap any input (originals are never modified)."""
    o = out.resolve()
    for src in inputs:
        s = src.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ValueError(f"output {out} overlaps input {src}")
