"""Output names from untrusted identity names and file names.

The original identity name is kept in the manifest; the output folder gets a *safe* name: Unicode
letters and digits, '-', '_' and '.' are kept, everything else (spaces, punctuation) becomes '_'.
A name is kept unchanged only when it is already safe, is not one of OUT's own entries ("manifest",
"run.json", "metrics.prom") and does not end like a hashed name ("-" and 16 hex digits);
every other name gets "-" and a 16-hex hash of the original appended ("a b" → "a_b-<hash>", "a_b"
stays "a_b", and an identity literally named "a_b-<hash>" gets a hash of its own). So a kept name
never equals a hashed one, and two hashed names collide only if 64-bit hashes do (~1e-5 for 10
million names that clean to the same string). Planning still checks every run (`plan.plan_rows`).
Names that try to address other paths (separators, "..", control characters, leading dots) are
rejected, not rewritten: the identity gets a `failed` row saying so.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata

MAX_NAME_CHARS = 120
NAME_HASH_CHARS = 16  # 64 bits: folder names of millions of identities must not collide
RESERVED = {"manifest", "run.json", "metrics.prom"}  # entries of OUT that are not identity folders
_UNSAFE = re.compile(r"[^\w.\-]", re.UNICODE)
_LOOKS_HASHED = re.compile(rf"-[0-9a-f]{{{NAME_HASH_CHARS}}}$")


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def identity_problem(name: str) -> str | None:
    """Why an identity name is refused, or None when it is usable."""
    if not isinstance(name, str) or not name.strip():
        return "identity name is empty"
    if "/" in name or "\\" in name:
        return f"identity name {name!r} contains a path separator"
    if name.strip() in (".", "..") or name.startswith("."):
        return f"identity name {name!r} starts with '.' (hidden or parent-directory path)"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in name):
        return f"identity name {name!r} contains control characters"
    return None


def safe_name(name: str) -> str:
    """A filesystem- and URL-safe folder/file name for `name` (see module doc); stable across runs."""
    nfc = unicodedata.normalize("NFC", name)
    cleaned = _UNSAFE.sub("_", nfc).lstrip(".")[:MAX_NAME_CHARS] or "_"
    keep = cleaned == name and cleaned.lower() not in RESERVED and not _LOOKS_HASHED.search(cleaned)
    return cleaned if keep else f"{cleaned}-{short_hash(name, NAME_HASH_CHARS)}"


def is_safe(name: str) -> bool:
    """`name` is already made of safe characters (e.g. a name `safe_name` produced, hashed or not)."""
    return bool(name) and not _UNSAFE.search(name) and not name.startswith(".")


def rejected_name(name: str) -> str:
    """Where a rejected identity's manifest row is stored (never used as an output folder)."""
    return f"_rejected-{short_hash(str(name), 16)}"


def output_stems(uris: list[str]) -> list[str]:
    """One output stem per input URI, unique within the identity.

    The stem is the safe form of the file's own stem. When two inputs of one identity share it
    (`a.jpg` and `a.png`, or `x/a.jpg` and `y/a.jpg` in a manifest), each of them gets
    `<stem>-<hash of its URI>` instead, so no output overwrites another and the mapping is stable.
    """
    stems = [safe_name(posixpath.splitext(posixpath.basename(u.rstrip("/")))[0] or "image") for u in uris]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1  # case-insensitive filesystems too
    return [f"{s}-{short_hash(u)}" if counts[s.lower()] > 1 else s for s, u in zip(stems, uris)]
