"""Colour profiles: a photo is protected in its own colour space and written with the same ICC profile.

A Display-P3 photo (every recent iPhone) holds P3 values; read as sRGB and written untagged, its
colours would shift in every colour-managed viewer. Converting it to sRGB instead would clip its
wide-gamut colours. So the values are protected as they are — which is also what an attacker's
training code sees, since `Image.open(...).convert("RGB")` ignores the profile — and the output
carries the input's ICC profile byte for byte: a viewer renders the protected photo as it rendered
the original, within the perturbation.

An RGB profile is recognised from its 128-byte header alone (no profile parser runs on it). A
profile of another colour space cannot tag the RGB output: a CMYK or grayscale photo with its
profile is converted to sRGB through littlecms (Pillow's ImageCms) and written untagged, which every
viewer reads as sRGB. A profile that is unreadable, or does not match the photo, is dropped with a
note (its values are then read as sRGB, as before).
"""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageCms

ICC_HEADER_BYTES = 128
ICC_SIGNATURE = b"acsp"
COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "YCbCr")  # modes an RGB profile describes
TO_SRGB = {("CMYK", "CMYK"), ("GRAY", "L"), ("GRAY", "LA")}  # (profile space, mode) converted to sRGB


def colour_space(icc: bytes) -> str | None:
    """The profile's data colour space from its header ("RGB", "CMYK", "GRAY", …), or None when the bytes
    are not an ICC profile."""
    if len(icc) < ICC_HEADER_BYTES or icc[36:40] != ICC_SIGNATURE:
        return None
    return icc[16:20].decode("ascii", "replace").strip() or None


@lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """A CMYK or grayscale image → sRGB RGB through its own profile (alpha of LA kept aside by the caller)."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.profileToProfile(img, source, _srgb(), outputMode="RGB")


def apply_profile(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None, str | None]:
    """(image, ICC profile to write with the output or None, a note or None) for a decoded photo and the
    profile it came with (`img.info["icc_profile"]`).

    RGB profile on a colour photo: kept as it is. CMYK or gray profile on a photo of that kind: the
    pixels are converted to sRGB, nothing to write. Anything else: the profile is dropped, with a note."""
    if not icc:
        return img, None, None
    space = colour_space(icc)
    if space == "RGB" and img.mode in COLOUR_MODES:
        return img, bytes(icc), None
    if (space, img.mode) in TO_SRGB:
        try:
            alpha = img.getchannel("A") if img.mode == "LA" else None
            converted = _to_srgb(img.convert("L") if alpha is not None else img, icc)
            if alpha is not None:
                converted.putalpha(alpha)
            return converted, None, f"{space} colour profile converted to sRGB"
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            return img, None, f"{space} colour profile unusable ({exc}); colours read as sRGB"
    what = f"{space} colour profile" if space else "unreadable colour profile"
    return img, None, f"{what} does not describe this {img.mode} photo; dropped, colours read as sRGB"
