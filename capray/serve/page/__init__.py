"""The web page at `/`: paste an API key, drop one person's photos, watch them upload and get protected,
compare each with its original, download them, delete them from the server.

Three plain files ship as package data (no build step, no CDN: it works air-gapped): `index.html`, a
template the server facts are rendered into here (html-escaped), and its assets `page.js` and `page.css`,
served at `static/<name>`. The page runs under `CSP`: no inline script or style, so the facts page.js
needs travel as a `<script type="application/json">` block, which the browser never executes.
"""

from __future__ import annotations

import html
import json
import re
from functools import cache
from importlib import resources
from typing import Any

ASSETS: dict[str, str] = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}

# blob: and data: images are the photos the page shows (object URLs of the chosen files and of the protected
# ones it fetched with the API key); everything else comes from this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

DEFAULT_ACCEPT = ["image/png", "image/jpeg", "image/webp", "image/heic", "image/heif", ".heic", ".heif"]
_SLOT = re.compile(r"\{\{(\w+)\}\}")


@cache
def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def asset(name: str) -> bytes:
    """The bytes of asset `name` (a key of ASSETS); KeyError for any other name."""
    if name not in ASSETS:
        raise KeyError(name)
    return _file(name)


def _size(n: int) -> str:
    """Bytes as a person reads them, in the decimal units the limits are set in (20_000_000 → "20 MB")."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


_FORMAT_NAMES = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WebP", "tif": "TIFF", "tiff": "TIFF",
                 "bmp": "BMP", "heic": "HEIC/HEIF", "heif": "HEIC/HEIF"}


def format_names(accept: list[str]) -> list[str]:
    """The formats a person would call them, from MIME types and suffixes ("image/jpeg", ".jpg" → "JPEG")."""
    names: list[str] = []
    for item in accept:
        kind = item.lower().rpartition("/")[2].lstrip(".")
        name = _FORMAT_NAMES.get(kind, kind.upper())
        if name and name not in names:
            names.append(name)
    return names


def _in_words(names: list[str]) -> str:
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def facts(info: dict[str, Any]) -> dict[str, Any]:
    """The server facts the page shows and checks against, with their types made sure (and `formats`, the
    accepted formats by name, added)."""
    accept = [str(a) for a in info.get("accept", DEFAULT_ACCEPT)]
    return {
        "tiny_model": bool(info.get("tiny_model", False)),
        "notes": [str(n) for n in info.get("notes", [])],
        "max_photos": int(info["max_photos"]),
        "max_photo_bytes": int(info["max_photo_bytes"]),
        "max_request_bytes": int(info["max_request_bytes"]),
        "max_request_pixels": int(info["max_request_pixels"]),
        "min_image_side": int(info["min_image_side"]),
        "accept": accept,
        "formats": format_names(accept),
    }


def _banner(f: dict[str, Any]) -> str:
    if not f["tiny_model"]:
        return ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in f["notes"])
    return ('<div id="tiny-model-banner" class="banner" role="alert">'
            "<p><strong>Test server: this server runs the tiny random test model. Its outputs are NOT a "
            "protection</strong> — the photos it returns are changed a little, but nothing about them stops a "
            "generator from learning the face.</p>"
            + (f'<ul class="banner-notes">{notes}</ul>' if notes else "") + "</div>")


def _limits(f: dict[str, Any]) -> str:
    n = f["max_request_pixels"]
    pixels = f"{n / 1e6:.3g} megapixels" if n >= 10**6 else f"{n:,} pixels"
    return (f"Up to {f['max_photos']} photos, each up to {_size(f['max_photo_bytes'])}, "
            f"{_size(f['max_request_bytes'])} and {pixels} in all; "
            f"at least {f['min_image_side']} px a side. {_in_words(f['formats'])}.")


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no "</script>" or "<!--" can close or confuse it."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(info: dict[str, Any]) -> str:
    """The page's HTML with the server facts in `info` rendered in (see `facts` for its keys)."""
    f = facts(info)
    slots = {
        "banner": _banner(f),
        "limits": html.escape(_limits(f)),
        "accept": html.escape(",".join(f["accept"]), quote=True),
        "info_json": _script_json(f),
    }
    return _SLOT.sub(lambda m: slots[m.group(1)], _file("index.html").decode("utf-8"))
