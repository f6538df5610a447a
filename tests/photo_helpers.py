"""Real-world photo files made in the test: a Display-P3 ICC profile, P3 JPEGs and HEICs with EXIF.

No ICC profile ships with the packages here, so `display_p3_icc()` writes one from the ICC spec: a
matrix/TRC display profile (v2) with Display P3's primaries (D50-adapted, as in Apple's profile) and the
sRGB transfer curve — what an iPhone photo carries.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

# Display P3 colorants, D50-adapted (Bradford), and the ICC D50 white
P3_COLORANTS = {"rXYZ": (0.515121, 0.241196, -0.001053), "gXYZ": (0.291977, 0.692245, 0.041885),
                "bXYZ": (0.157104, 0.066574, 0.784073)}
D50 = (0.964203, 1.0, 0.824905)
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # parametric curve type 3


def _s15(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _xyz(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(*xyz)


def _para(params: tuple[float, ...]) -> bytes:
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + _s15(*params)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)


def _profile(space: bytes, tags: list[tuple[str, bytes]]) -> bytes:
    """An ICC v2 display profile of colour space `space` (4 bytes) holding `tags`."""
    tags = [("cprt", b"text\0\0\0\0" + b"No copyright, test profile\0"), ("wtpt", _xyz(D50)), *tags]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table.append(struct.pack(">4sII", sig.encode(), offset + len(data), len(body)))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntr" + space + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0" * 4 + _s15(*D50) + b"\0" * 4)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


def display_p3_icc(name: str = "Display P3") -> bytes:
    """An ICC v2 display profile with Display P3's primaries and the sRGB curve."""
    return _profile(b"RGB ", [("desc", _desc(name)), *((sig, _xyz(v)) for sig, v in P3_COLORANTS.items()),
                              *((sig, _para(SRGB_CURVE)) for sig in ("rTRC", "gTRC", "bTRC"))])


def gray_icc(gamma: float = 1.0) -> bytes:
    """A grayscale display profile with a pure gamma curve (1.0: linear light, far from sRGB's curve)."""
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    return _profile(b"GRAY", [("desc", _desc(f"Gray gamma {gamma}")), ("kTRC", curve)])


def exif_block(*, when: str = "2024:05:01 10:00:00", gps: bool = True, orientation: int | None = None) -> bytes:
    """EXIF as a camera writes it: capture time, camera, serial, optionally GPS and an orientation."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Apple", "iPhone 15", when  # Make, Model, DateTime
    if orientation:
        exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    sub[0x9003], sub[0x9011], sub[0xA431] = when, "+02:00", "F2LXK0Q1N72P"  # DateTimeOriginal, offset, serial
    if gps:
        loc = exif.get_ifd(0x8825)
        loc[1], loc[2], loc[3], loc[4] = "N", (52.0, 31.0, 12.5), "E", (13.0, 24.0, 0.0)
    return exif.tobytes()


def saturated_photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Vivid colours (where P3 and sRGB differ most) with some texture."""
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.uint8)
    base[:, : w // 3] = (230, 20, 30)
    base[:, w // 3: 2 * w // 3] = (20, 210, 40)
    base[:, 2 * w // 3:] = (30, 40, 220)
    return np.clip(base.astype(int) + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **save)
    return buf.getvalue()


def p3_jpeg(rgb: np.ndarray, **exif) -> bytes:
    return encode(rgb, "JPEG", quality=95, icc_profile=display_p3_icc(), exif=exif_block(**exif))


def p3_heic(rgb: np.ndarray, **exif) -> bytes:
    import pillow_heif  # noqa: F401 - registers the HEIF saver (capray.io.images does too)

    return encode(rgb, "HEIF", quality=95, icc_profile=display_p3_icc(), exif=exif_block(**exif))
