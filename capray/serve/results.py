"""Engine output → what a client downloads: lossless PNG or WebP files (alpha re-attached unchanged, the
photo's colour profile and kept metadata written with it) and a summary."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from capray.attack.api import ProtectionRecord
from capray.config import CaprayConfig
from capray.serve.schemas import JobResult, PhotoOut


def build_result(names: list[str | None], decoded: list[Any], protected: list[Any],
                 record: ProtectionRecord, cfg: CaprayConfig) -> tuple[list[bytes], JobResult]:
    """(the file bytes per photo, in `output.format`; the result without pixel data)."""
    from capray.io.images import encode_photo

    files, photos = [], []
    for i, (name, src, rgb) in enumerate(zip(names, decoded, protected)):
        encoded = encode_photo(rgb, src.alpha, fmt=cfg.output.format, icc=src.icc, exif=src.exif)
        files.append(encoded.data)
        photos.append(PhotoOut(name=name, format=encoded.format, width=rgb.shape[1], height=rgb.shape[0],
                               linf_255=record.linf_255[i], psnr=record.psnr[i], ssim=record.ssim[i],
                               notes=[*src.notes, *([encoded.note] if encoded.note else [])]))
    result = JobResult(**record.model_dump(), photos=photos, eps=cfg.attack.eps,
                           eps_255=cfg.attack.eps * 127.5)
    return files, result


def zip_name(index: int, name: str | None, fmt: str = "png") -> str:
    """`<index>_<original stem>.<png|webp>`, safe as a file name in any archive tool."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", (name or "").rsplit("/", 1)[-1].rsplit(".", 1)[0]).strip("._")
    return f"{index:02d}_{stem or 'photo'}.{fmt}"


class _Sink:
    """A write-only stream the zip is written into and drained from, entry by entry."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def result_zip(result: JobResult, read_photo: Callable[[int, str], bytes | None]) -> Iterator[bytes]:
    """All protected photos plus `summary.json` (the result record), as chunks to stream: one photo is read
    (`read_photo(i, format)`) and held at a time, so a download costs the server one photo of memory, not
    the job's. Photos are stored, not recompressed; fixed timestamps make the bytes deterministic."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w") as zf:
        for i, photo in enumerate(result.photos):
            data = read_photo(i, photo.format)
            if data is None:
                raise FileNotFoundError(f"protected photo {i} is missing from the job store")
            zf.writestr(zipfile.ZipInfo(zip_name(i, photo.name, photo.format), (1980, 1, 1, 0, 0, 0)), data)
            yield sink.drain()
        summary = json.dumps(result.model_dump(mode="json", exclude={"photos": {"__all__": {"png"}}}), indent=1)
        zf.writestr(zipfile.ZipInfo("summary.json", (1980, 1, 1, 0, 0, 0)), summary)
    yield sink.drain()
