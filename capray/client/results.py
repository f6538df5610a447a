"""What a finished job gives back: the protected photos (bytes and their metrics) and the job's record.

File names come from the server's echo of the upload names, so they are made safe before they touch the
disk: a name with separators or dots cannot write outside the chosen folder.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capray.io.naming import output_stems

_FORMAT = re.compile(r"^[a-z0-9]{1,8}$")


@dataclass
class ProtectedPhoto:
    """One protected photo: the file as the server encoded it (lossless PNG or WebP) and how far it moved."""

    name: str | None
    format: str
    data: bytes
    width: int | None = None
    height: int | None = None
    linf_255: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_result(cls, meta: dict, data: bytes, content_type: str = "") -> ProtectedPhoto:
        fmt = str(meta.get("format") or content_type.split(";")[0].removeprefix("image/") or "png").lower()
        return cls(name=meta.get("name"), format=fmt, data=data, width=meta.get("width"),
                   height=meta.get("height"), linf_255=meta.get("linf_255"), psnr=meta.get("psnr"),
                   ssim=meta.get("ssim"), notes=list(meta.get("notes") or []))

    @property
    def extension(self) -> str:
        return self.format if _FORMAT.match(self.format) else "png"

    def image(self):
        """The photo decoded as a PIL image (pixels loaded, so the bytes can go)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, directory: str | Path, stem: str | None = None) -> Path:
        """Write `<directory>/<stem>.<format>` (stem: the safe form of the original name's) and return the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem or output_stems([self.name or 'photo'])[0]}.{self.extension}"
        path.write_bytes(self.data)
        return path


@dataclass
class ProtectResult:
    """A protected job: its photos, the result record (ε, notes… without the photos) and the final status."""

    job_id: str
    photos: list[ProtectedPhoto]
    record: dict[str, Any]
    status: dict[str, Any]

    def save(self, out_dir: str | Path) -> list[Path]:
        """Every photo (names kept apart when two share a stem) and `summary.json`; returns the photos' paths."""
        out_dir = Path(out_dir)
        stems = output_stems([p.name or f"photo-{i}" for i, p in enumerate(self.photos)])
        paths = [photo.save(out_dir, stem) for photo, stem in zip(self.photos, stems)]
        (out_dir / "summary.json").write_text(json.dumps(self.summary(paths), indent=2) + "\n")
        return paths

    def summary(self, paths: list[Path] | None = None) -> dict[str, Any]:
        """The result record with each photo's metrics (and the file it was saved as)."""
        metas = (self.status.get("result") or {}).get("photos") or [{} for _ in self.photos]
        photos = []
        for i, meta in enumerate(metas):
            entry = {k: v for k, v in meta.items() if k != "url"}  # the server's URL dies with the job
            if paths is not None and i < len(paths):
                entry["file"] = paths[i].name
            photos.append(entry)
        return {"job_id": self.job_id, **self.record, "photos": photos}
