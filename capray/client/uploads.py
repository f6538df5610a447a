"""Turn what a caller has in hand (a path, file bytes, a PIL image, a numpy array) into upload parts.

Files are sent as they are, so the server sees the camera's own bytes (format, colour profile, EXIF
orientation); only in-memory images are encoded, as lossless PNG.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".heic": "image/heic", ".heif": "image/heif", ".bmp": "image/bmp", ".tif": "image/tiff",
               ".tiff": "image/tiff"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))

Part = tuple[str, bytes, str]  # (file name, bytes, content type)


def photo_part(photo: Any, index: int) -> Part:
    """One `photo` part; unnamed inputs are called photo-<index> with the extension of their format."""
    if isinstance(photo, tuple) and len(photo) == 2 and isinstance(photo[0], str):
        name, inner = photo  # (name, photo): a name for bytes or an image held in memory
        _, data, content_type = photo_part(inner, index)
        return name, data, content_type
    if isinstance(photo, str | os.PathLike):
        path = Path(photo)
        data = path.read_bytes()
        return path.name, data, content_type_for(path.name, data)
    if isinstance(photo, bytes | bytearray | memoryview):
        data = bytes(photo)
        suffix = sniff_suffix(data)
        return f"photo-{index}{suffix}", data, IMAGE_TYPES.get(suffix, "application/octet-stream")
    if _is_pil_image(photo):
        stem = Path(getattr(photo, "filename", "") or f"photo-{index}").stem
        return f"{stem}.png", _png_from_pil(photo), "image/png"
    if _is_ndarray(photo):
        return f"photo-{index}.png", _png_from_array(photo), "image/png"
    raise TypeError(f"photo {index}: expected a path, bytes, a PIL image or a numpy array, got {type(photo).__name__}")


def content_type_for(name: str, data: bytes) -> str:
    """From the file's extension, else its signature (a photo saved without one)."""
    return IMAGE_TYPES.get(Path(name).suffix.lower()) or IMAGE_TYPES.get(sniff_suffix(data), "application/octet-stream")


def sniff_suffix(data: bytes) -> str:
    """The file extension the bytes' signature says ('' when unknown: the server decides)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"):
        return ".heic"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), "")


def _is_pil_image(obj: Any) -> bool:
    image_module = sys.modules.get("PIL.Image")  # not imported means it cannot be a PIL image
    return image_module is not None and isinstance(obj, image_module.Image)


def _is_ndarray(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


def _png_from_pil(image) -> bytes:
    """Lossless PNG, keeping the colour profile so the server sees the same colours."""
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buf = io.BytesIO()
    icc = image.info.get("icc_profile")
    image.save(buf, format="PNG", **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def _png_from_array(array) -> bytes:
    if array.dtype.name != "uint8" or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"a numpy photo must be uint8 HxWx3 (RGB) or HxWx4 (RGBA), got {array.dtype} "
                         f"{'x'.join(map(str, array.shape))}")
    from PIL import Image

    return _png_from_pil(Image.fromarray(array))  # uint8 HxWx3 → RGB, HxWx4 → RGBA
