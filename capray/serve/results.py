"""Engine output → what a client downloads: lossless PNGs (alpha re-attached unchanged) and a summary."""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

from capray.attack.api import ProtectionRecord
from capray.config import CaprayConfig
from capray.serve.schemas import JobResult, PhotoOut


def build_result(names: list[str | None], decoded: list[Any], protected: list[Any],
                 record: ProtectionRecord, cfg: CaprayConfig) -> tuple[list[bytes], JobResult]:
    """(PNG bytes per photo, the result without pixel data)."""
    from capray.io.images import encode_png

    pngs, photos = [], []
    for i, (name, src, rgb) in enumerate(zip(names, decoded, protected)):
        pngs.append(encode_png(rgb, src.alpha))
        photos.append(PhotoOut(name=name, width=rgb.shape[1], height=rgb.shape[0], linf_255=record.linf_255[i],
                               psnr=record.psnr[i], ssim=record.ssim[i], notes=list(src.notes)))
    result = JobResult(**record.model_dump(), photos=photos, eps=cfg.attack.eps,
                           eps_255=cfg.attack.eps * 127.5)
    return pngs, result


def zip_name(index: int, name: str | None) -> str:
    """`<index>_<original stem>.png`, safe as a file name in any archive tool."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", (name or "").rsplit("/", 1)[-1].rsplit(".", 1)[0]).strip("._")
    return f"{index:02d}_{stem or 'photo'}.png"


def result_zip(result: JobResult, pngs: list[bytes]) -> bytes:
    """All protected PNGs plus `summary.json` (the result record); PNGs are stored, not recompressed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (photo, png) in enumerate(zip(result.photos, pngs)):
            zf.writestr(zipfile.ZipInfo(zip_name(i, photo.name), (1980, 1, 1, 0, 0, 0)), png)
        summary = json.dumps(result.model_dump(mode="json", exclude={"photos": {"__all__": {"png"}}}), indent=1)
        zf.writestr(zipfile.ZipInfo("summary.json", (1980, 1, 1, 0, 0, 0)), summary)
    return buf.getvalue()
