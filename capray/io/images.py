"""Decode untrusted photos safely and encode protected ones losslessly.

Only photo formats are decoded (`PHOTO_FORMATS`): a file whose header says PSD, FITS, EPS, DDS or any
other format Pillow knows is refused by name before any decoder of it runs (`UnsupportedFormat`),
so an exploit in a rarely used parser is not reachable from an upload. Decoding checks the file
size, the image header's pixel count (decompression bombs) and the minimum side *before* pixels are
decoded, refuses truncated files (Pillow's default), applies the EXIF
orientation (the photo is protected and written the way it is displayed), and maps every mode to
8-bit RGB: grayscale is replicated to three channels, CMYK goes through its profile or Pillow's conversion, 16-bit
images are scaled (not clipped) to 8 bits. An alpha channel is kept aside and re-attached unchanged
to the output: the RGB channels are what an attacker's `convert("RGB")` sees, so they are what gets
protected. The photo's colour profile and the metadata the policy keeps travel with it to the output
(`capray.io.colour`, `capray.io.metadata`). HEIC/HEIF (iPhone cameras' format) is decoded by the
pillow-heif plugin, registered here without thumbnails, depth or auxiliary images.

Output is lossless — PNG, or WebP lossless (`output.format`), which holds the same pixels in fewer
bytes; JPEG would erase the perturbation — with fixed encoder settings, so the same pixels, profile
and kept metadata always give the same bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capray.io.colour import apply_profile
from capray.io.metadata import kept_exif

try:  # HEIC/HEIF: a maintained plugin (libheif); only the primary image is ever decoded
    import pillow_heif

    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
except ImportError:  # pragma: no cover - a dependency; without it HEIF is simply not in photo_formats()
    pass

PNG_COMPRESS_LEVEL = 6
# libwebp lossless, method 4 at quality (effort) 25: on protected 512 px faces ~20% smaller than PNG in
# about twice PNG's time; method 0 is faster than PNG but saves ~15%, quality 80+ and method 6 cost 1.5-50x
# the time for under 1% more (benchmarks/output_format.py). `exact` keeps RGB under transparent pixels.
WEBP_OPTIONS = {"lossless": True, "quality": 25, "method": 4, "exact": True}
WEBP_MAX_SIDE = 16383  # the WebP format's limit; a larger photo is written as PNG
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}


class BadImage(ValueError):
    """A photo that cannot be used; the message says why in words a user understands."""


class UnsupportedFormat(BadImage):
    """A file of an image format capray does not decode (the endpoint answers 415)."""


# Photo formats decoded from untrusted input. HEIF/HEIC joins when the pillow-heif plugin is installed.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "HEIF")


def photo_formats() -> tuple[str, ...]:
    """The allowlist's formats this Pillow can open (HEIF only with its plugin registered)."""
    Image.init()
    return tuple(f for f in PHOTO_FORMATS if f in Image.OPEN)


# How a browser or an upload names each allowed format (an <input type=file accept=…>): MIME types, suffixes.
FORMAT_NAMES = {"JPEG": ("image/jpeg", ".jpg", ".jpeg"), "PNG": ("image/png", ".png"), "WEBP": ("image/webp", ".webp"),
                "TIFF": ("image/tiff", ".tif", ".tiff"), "BMP": ("image/bmp", ".bmp"),
                "HEIF": ("image/heic", "image/heif", ".heic", ".heif")}


def accepted_names() -> list[str]:
    """The MIME types and suffixes of the formats this Pillow decodes (`photo_formats`)."""
    return [name for fmt in photo_formats() for name in FORMAT_NAMES[fmt]]


def sniff_format(data: bytes) -> str | None:
    """The format a file's first bytes announce, by Pillow's own prefix checks (no decoder runs), or None."""
    Image.init()
    prefix = data[:64]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(prefix):
            return fmt
    return None


def check_format(data: bytes) -> None:
    """`UnsupportedFormat` naming the format when the file is an image of a format not allowed."""
    fmt = sniff_format(data)
    if fmt is not None and fmt not in photo_formats():
        raise UnsupportedFormat(f"{fmt} files are not accepted; send {', '.join(photo_formats())}")


def open_photo(data: bytes) -> Image.Image:
    """Open a photo's header with the allowlisted decoders only (pixels load later, after the checks)."""
    check_format(data)
    return Image.open(io.BytesIO(data), formats=photo_formats())


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, displayed orientation, in the colour space of `icc`
    alpha: np.ndarray | None  # (H, W) uint8 or None
    notes: list[str]
    icc: bytes | None = None  # the RGB colour profile to write with the output (None: sRGB)
    exif: bytes | None = None  # the EXIF block to write with the output (the metadata policy's tags)


def _to_rgb_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    notes: list[str] = []
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr
        else:
            scaled = arr * (255.0 / 65535.0)
            notes.append("16-bit grayscale scaled to 8 bits")
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None, notes
    if mode == "F":
        raise BadImage("floating-point images are not supported")
    alpha = None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = np.array(img.getchannel("A"))
        if alpha.min() == 255:
            alpha = None  # fully opaque: nothing to keep
        else:
            notes.append("alpha channel kept unchanged")
    if img.mode in ("L", "1"):
        notes.append("grayscale written as RGB")
    elif img.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    rgb = np.array(img.convert("RGB"))
    return rgb, alpha, notes


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 8,
                 max_pixels_key: str = "batch.max_image_pixels", **metadata: bool) -> DecodedImage:
    """Bytes → RGB uint8 (+ alpha, profile, kept EXIF), or `BadImage` with a clear reason (`max_pixels_key`:
    the setting to name; `metadata`: `keep_capture_time`, `keep_location` as in `output.*`)."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decoded_from_pil(open_photo(data), max_pixels=max_pixels, min_side=min_side,
                                    max_pixels_key=max_pixels_key, **metadata)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"could not decode image: {exc}") from None


def decoded_from_pil(img: Image.Image, *, max_pixels: int, min_side: int = 8,
                     max_pixels_key: str = "batch.max_image_pixels", keep_capture_time: bool = True,
                     keep_location: bool = False) -> DecodedImage:
    """An opened (possibly not yet loaded) PIL image → RGB uint8 (+ alpha, profile, kept EXIF), checked
    before its pixels load."""
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"{w}x{h} = {w * h} pixels is over the {max_pixels_key} limit of "
                       f"{max_pixels} (decompression-bomb guard)")
    if min(w, h) < min_side:
        raise BadImage(f"{w}x{h} is too small (shorter side under {min_side} px)")
    frames = getattr(img, "n_frames", 1)
    img.load()
    exif = kept_exif(img, keep_capture_time=keep_capture_time, keep_location=keep_location)
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    img, icc, colour_note = apply_profile(img, icc)
    rgb, alpha, notes = _to_rgb_alpha(img)
    if colour_note:
        notes.append(colour_note)
    if frames > 1:
        notes.append("animated image: first frame used")
    return DecodedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, notes=notes, icc=icc, exif=exif)


def output_format(fmt: str, shape: tuple[int, ...]) -> tuple[str, str | None]:
    """(the format a photo of `shape` (H, W) is written in when `fmt` is asked for, why not `fmt` or None)."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(MEDIA_TYPES)}")
    if fmt == "webp" and max(shape[:2]) > WEBP_MAX_SIDE:
        return "png", f"written as PNG: WebP holds at most {WEBP_MAX_SIDE} px a side"
    return fmt, None


@dataclass(frozen=True)
class EncodedPhoto:
    data: bytes
    format: str  # "png" or "webp": the output's suffix
    note: str | None = None  # why it is not in the format asked for

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def encode_photo(rgb: np.ndarray, alpha: np.ndarray | None = None, *, fmt: str = "png", icc: bytes | None = None,
                 exif: bytes | None = None) -> EncodedPhoto:
    """RGB(A) uint8 → lossless PNG or WebP bytes with the photo's profile and kept EXIF, deterministic."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    fmt, note = output_format(fmt, rgb.shape[:2])
    pixels = np.dstack([rgb, alpha]) if alpha is not None else rgb
    extra = {k: v for k, v in (("icc_profile", icc), ("exif", exif)) if v}
    options = WEBP_OPTIONS if fmt == "webp" else {"compress_level": PNG_COMPRESS_LEVEL}
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=fmt.upper(), **options, **extra)
    return EncodedPhoto(buf.getvalue(), fmt, note)


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    """RGB(A) uint8 → PNG bytes, deterministic (fixed compression, no metadata)."""
    return encode_photo(rgb, alpha).data
