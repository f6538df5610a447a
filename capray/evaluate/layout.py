"""What to evaluate: identities in the clean folder and the photo sets ("sources") to attack for each.

Folders use the output layout `DIR/<identity>/<photo>`; a `capray protect` output folder also holds
`manifest/` and `run.json`, which are not identities. A protected folder's label comes from its
run.json (method and CAP on/off, e.g. "ASPL+CAP"), else from the folder's name. Each purification
adds one more source per protected folder ("ASPL+CAP · JPEG q75"); one that cannot run here carries
its reason and is reported, never trained on.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capray.evaluate.files import EvalFiles
from capray.evaluate.purification import Transform
from capray.io.naming import RESERVED, is_safe, output_stems, safe_name
from capray.io.storage import join, normalize_uri, overlaps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
METHOD_NAMES = {"fsmg": "FSMG", "aspl": "ASPL", "simac": "SimAC"}


@dataclass(frozen=True)
class Source:
    """One photo set the attacker fine-tunes on."""

    key: str  # filesystem-safe, unique
    label: str  # shown in the report
    group: str  # the method table it belongs to ("clean" sources appear in every table)
    root: str
    protected: bool
    cap: bool | None = None
    transform: Transform | None = field(default=None)  # the purification applied before training
    base: str | None = None  # a purified set: the key of the protected set it purifies
    unavailable: str | None = None  # a purification that cannot run here: why, and how to supply its model


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def protected_label(root: str | Path, files: EvalFiles | None = None) -> tuple[str, str, bool | None]:
    """(label, method group, cap) from run.json if it names the method, else the folder name; a run with
    `attack.robust` on is labelled "… robust", so plain and robust sets of one method read apart."""
    root = normalize_uri(str(root))
    try:
        text = (files or EvalFiles()).read_text(join(root, "run.json"))
        data = json.loads(text) if text is not None else None
        conf = data.get("config", data) if isinstance(data, dict) else {}
        method = str(conf["attack"]["method"]).lower()
        cap = bool(conf.get("cap", {}).get("enabled", False))
        robust = bool(conf["attack"].get("robust", {}).get("enabled", False))
        name = METHOD_NAMES.get(method, method)
        return (f"{name}+CAP" if cap else name) + (" robust" if robust else ""), name, cap
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        name = posixpath.basename(root)
        return name, name, None


def plan_sources(clean: str | Path, protected: list[str | Path], transforms: list[Transform],
                 files: EvalFiles | None = None,
                 unavailable: dict[Transform, str | None] | None = None) -> list[Source]:
    """Clean, then each protected folder followed by its purified variants (`unavailable`: transform → reason)."""
    sources = [Source("clean", "clean", "clean", normalize_uri(str(clean)), protected=False)]
    seen = {"clean"}
    reasons = unavailable or {}
    for root in map(normalize_uri, map(str, protected)):
        label, group, cap = protected_label(root, files)
        base_key = None
        for transform in [None, *transforms]:
            full = label if transform is None else f"{label} · {transform.label}"
            key = slugify(full if transform is None else f"{label}-{transform.slug}")
            base, n = key, 2
            while key in seen:  # two folders with the same method: keep both, distinct keys
                key, n = f"{base}-{n}", n + 1
            seen.add(key)
            sources.append(Source(key, full if key == base else f"{full} ({posixpath.basename(root)})", group, root,
                                  protected=True, cap=cap, transform=transform, base=base_key,
                                  unavailable=reasons.get(transform) if transform is not None else None))
            base_key = base_key or key
    return sources


def identity_folders(source: Source, identity: str) -> list[str]:
    """Where a source may hold an identity's photos, most likely first.

    `capray protect` writes identity X to `OUT/<safe_name(X)>/`; a hand-made folder uses X itself.
    """
    names = [identity] if not source.protected else list(dict.fromkeys([safe_name(identity), identity]))
    return [join(source.root, name) for name in names]


def list_identities(root: str | Path, files: EvalFiles | None = None) -> list[str]:
    """Identity folders under `root`; protect's own entries (manifest/) and hidden ones are skipped."""
    names = (files or EvalFiles()).list_dirs(str(root))
    return [n for n in names if n not in RESERVED and not n.startswith(".")]


def list_photos(folder: str | Path, files: EvalFiles | None = None, *, protected: bool = False) -> dict[str, str]:
    """{pairing key: URI} of the image files in `folder` (by suffix), in key order.

    A clean photo's key is protect's output stem for it, computed over the same listing protect makes:
    protect writes `my photo.jpg` as `my_photo-<hash>.png` (and `a.jpg`/`a.png` under distinct stems).
    A protected photo whose stem is already safe keeps it as its key: protect named it (and renaming
    it again would hash it a second time, since names ending like a hash never pass through unchanged);
    a hand-made protected folder with unsafe names is keyed like a clean one.
    """
    uris = (files or EvalFiles()).list_files(str(folder))
    own = [posixpath.splitext(posixpath.basename(u))[0] for u in uris]
    stems = [o if protected and is_safe(o) else k for o, k in zip(own, output_stems(uris))]
    pairs = [(k, u) for k, u in zip(stems, uris)
             if posixpath.splitext(u)[1].lower() in IMAGE_SUFFIXES]
    return dict(sorted(pairs))


def load_photo_set(source: Source, identity: str, files: EvalFiles) -> tuple[dict[str, np.ndarray], list[str]]:
    """{pairing key: upright RGB} of one source's photos of `identity`; unreadable files become error lines."""
    found: dict[str, str] = {}
    for folder in identity_folders(source, identity):
        found = list_photos(folder, files, protected=source.protected)
        if found:
            break
    photos, errors = {}, []
    for key, uri in found.items():
        try:
            photos[key] = files.read_photo(uri, source.root)
        except Exception as exc:  # noqa: BLE001 - one bad photo must not sink the identity
            errors.append(f"{posixpath.basename(uri)}: {exc}")
    return photos, errors


def check_output(out: str | Path, inputs: list[str | Path]) -> None:
    """The output must not overlap any input (originals are never modified): protect's own check."""
    for src in inputs:
        if overlaps(str(out), str(src)):
            raise ValueError(f"output {out} overlaps input {src}")
