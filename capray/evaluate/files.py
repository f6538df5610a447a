"""Every byte `capray evaluate` reads or writes, through the same `capray.io` code as `capray protect`.

Inputs and `--out` are local paths or any fsspec URI (`s3://…`), with `batch.storage_options`.
Photos are decoded by `capray.io.images.decode_image` with protect's limits (`batch.max_file_bytes`,
`batch.max_image_pixels`, `batch.min_image_side`) and its EXIF orientation, so a clean photo is seen
exactly as protect saw it when it wrote the protected copy. Writes are `write_bytes_atomic`. The
limits are protect's because the photos are protect's: one set of knobs for one kind of input. So are
symbolic links: listed as what they point at, read only where protect would read them
(`capray.io.allowlist`: inside the evaluated folder or `batch.allowed_input_prefixes`).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capray.config import BatchConfig, CaprayConfig
from capray.io.allowlist import allowed_prefixes, read_problem
from capray.io.discover import is_junk
from capray.io.images import decode_image
from capray.io.storage import get_fs, join, normalize_uri, read_bytes, write_bytes_atomic


@dataclass(frozen=True)
class EvalFiles:
    """Storage options and decode limits; small and picklable, so it travels to Ray tasks."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    max_file_bytes: int = BatchConfig.model_fields["max_file_bytes"].default
    max_image_pixels: int = BatchConfig.model_fields["max_image_pixels"].default
    min_image_side: int = BatchConfig.model_fields["min_image_side"].default
    allowed_input_prefixes: tuple[str, ...] = ()  # where a symbolic link may lead, besides the folder itself

    @classmethod
    def from_config(cls, cfg: CaprayConfig) -> EvalFiles:
        b = cfg.batch
        return cls(dict(b.storage_options), b.max_file_bytes, b.max_image_pixels, b.min_image_side,
                   tuple(b.allowed_input_prefixes))

    def _fs(self, uri: str):
        return get_fs(str(uri), self.storage_options)

    # -- listing ----------------------------------------------------------------------------------
    def is_dir(self, uri: str) -> bool:
        fs, path = self._fs(uri)
        fs.invalidate_cache(path)  # see the folder as it is now (protect may just have written it)
        return fs.isdir(path)

    def _entries(self, uri: str) -> list[dict[str, Any]]:
        fs, path = self._fs(uri)
        fs.invalidate_cache(path)
        if not fs.isdir(path):
            return []
        return sorted(map(_followed, fs.ls(path, detail=True)), key=lambda e: e["name"])

    def list_dirs(self, uri: str) -> list[str]:
        """Names of the folders directly in `uri`, sorted; [] when no such folder."""
        return [posixpath.basename(e["name"].rstrip("/")) for e in self._entries(uri) if e["type"] == "directory"]

    def list_files(self, folder: str) -> list[str]:
        """URIs of the files directly in `folder` that protect would list too, sorted; [] when no such folder."""
        names = (posixpath.basename(e["name"].rstrip("/")) for e in self._entries(folder) if e["type"] == "file")
        return [join(normalize_uri(folder), n) for n in sorted(names) if not is_junk(n)]

    # -- reading and writing ----------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self._fs(uri)
        return read_bytes(fs, path, self.max_file_bytes)

    def read_text(self, uri: str) -> str | None:
        """A small text file (run.json), or None when it does not exist."""
        fs, path = self._fs(uri)
        if not fs.isfile(path):
            return None
        return read_bytes(fs, path, self.max_file_bytes).decode("utf-8")

    def read_photo(self, uri: str, root: str | None = None) -> np.ndarray:
        """HxWx3 uint8 RGB, upright (EXIF orientation applied), or ValueError saying why not. `root`: the
        folder being evaluated, where (or under `allowed_input_prefixes`) a symbolic link must lead."""
        refused = read_problem(uri, allowed_prefixes(root, list(self.allowed_input_prefixes))
                               if root is not None else None)
        if refused:
            raise ValueError(refused)
        return decode_image(self.read_bytes(uri), max_pixels=self.max_image_pixels,
                            min_side=self.min_image_side).rgb

    def write(self, uri: str, data: bytes) -> None:
        fs, path = self._fs(uri)
        write_bytes_atomic(fs, path, data)


def _followed(entry: dict[str, Any]) -> dict[str, Any]:
    """A local listing entry with a symbolic link shown as what it points at (fsspec lists links as
    "other"); a broken link as a file, so reading it says why it cannot be used."""
    if not entry.get("islink") or entry.get("type") != "other":
        return entry
    target = entry["name"]
    return dict(entry, type="directory" if os.path.isdir(target) else "file")
