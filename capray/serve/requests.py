"""Turn an HTTP request body (JSON with base64 photos, or multipart photo files) into a `Submission`.

Both forms end in the same thing — the photo files' bytes, their names, the identity and the config
overrides — so they give the same pixels. The body is read through `limits.guarded_receive` (size,
rate, the key's byte budget): JSON is held in memory only up to `serve.max_request_bytes` and parsed in
a worker thread (a 100 MB body must not stall the event loop); multipart files spool to disk as they stream.
Photos are decoded here too, after the pixel budget has been checked on their headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from capray.config import OutputConfig, ServeConfig
from capray.io.images import BadImage, DecodedImage, decode_image
from capray.serve.limits import RequestError, check_declared_length, guarded_receive
from capray.serve.schemas import ProtectOptions, ProtectRequest

PHOTO_FIELDS = ("photo", "photos")  # multipart file fields that carry photos (repeat the field per photo)
FIXED_FIELD = "fixed"  # multipart file field (repeated) of published protected photos held fixed (append)
OPTIONS_FIELD = "options"  # multipart JSON part: {"identity": …, "config": {…}}


@dataclass
class Submission:
    identity: str
    config: dict[str, Any]
    files: list[bytes]
    names: list[str | None] = field(default_factory=list)
    fixed_files: list[bytes] = field(default_factory=list)  # published photos held fixed (append mode)
    fixed_jobs: list[str] = field(default_factory=list)  # earlier jobs of the caller whose photos are held fixed


def submission_digest(sub: Submission) -> str:
    """What makes two submits the same request (Idempotency-Key): the photos' bytes, names, identity,
    overrides and fixed photos, whichever body form carried them (a retried multipart body has a new boundary)."""
    h = hashlib.sha256()
    h.update(json.dumps([sub.identity, sub.config, sub.names, sub.fixed_jobs], sort_keys=True, default=str).encode())
    for group in (sub.files, sub.fixed_files):
        h.update(b"|%d|" % len(group))
        for data in group:
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def _validation_error(exc: ValidationError, where: str = "") -> RequestError:
    errors = [{"loc": where + ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]
    return RequestError("malformed-request", "malformed request", errors=errors)


def check_counts(count: int, limits: ServeConfig, fixed: int = 0) -> None:
    if count == 0:
        raise RequestError("no-photos", "no photos: send at least one")
    if count + fixed > limits.max_photos:
        held = f" and {fixed} fixed" if fixed else ""
        raise RequestError("too-many-photos", f"{count} photos{held}; at most {limits.max_photos} per request")


def _b64_payload(data: str) -> str:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    return "".join(data.split())


def from_json(body: bytes, limits: ServeConfig) -> Submission:
    try:
        req = ProtectRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    check_counts(len(req.photos), limits, len(req.fixed))
    return Submission(req.identity, req.config, _b64_files(req.photos, limits), [p.name for p in req.photos],
                      _b64_files(req.fixed, limits, "fixed"), req.fixed_jobs)


def _b64_files(photos: list, limits: ServeConfig, where: str = "photo") -> list[bytes]:
    files = []
    for i, photo in enumerate(photos):
        payload = _b64_payload(photo.data)
        if len(payload) * 3 // 4 > limits.max_photo_bytes:
            raise RequestError("photo-too-large", f"photo larger than {limits.max_photo_bytes} bytes", **{where: i},
                               name=photo.name)
        try:
            files.append(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError("invalid-photo", "photo data is not valid base64", **{where: i},
                               name=photo.name) from None
    return files


async def from_multipart(request: Any, limits: ServeConfig) -> Submission:
    """`photo` file parts (repeated) and an optional JSON `options` part."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    try:
        form = await request.form(max_files=limits.max_photos + 1, max_fields=8, max_part_size=1_000_000)
    except StarletteHTTPException as exc:  # python-multipart's own refusals (too many files, bad framing)
        if "Too many files" in str(exc.detail):
            raise RequestError("too-many-photos", f"more than {limits.max_photos} photos; at most "
                                                  f"{limits.max_photos} per request") from None
        raise RequestError("malformed-request", f"malformed multipart body: {exc.detail}") from None
    try:
        uploads = [v for k, v in form.multi_items() if k in PHOTO_FIELDS and isinstance(v, UploadFile)]
        held = [v for k, v in form.multi_items() if k == FIXED_FIELD and isinstance(v, UploadFile)]
        check_counts(len(uploads), limits, len(held))
        raw = form.get(OPTIONS_FIELD)
        if isinstance(raw, UploadFile):
            raw = (await raw.read(1_000_001)).decode("utf-8", "replace")
        try:
            options = ProtectOptions.model_validate(json.loads(raw) if raw else {})
        except (json.JSONDecodeError, TypeError):
            raise RequestError("malformed-request", "the options part is not valid JSON") from None
        except ValidationError as exc:
            raise _validation_error(exc, "options.") from None
        files, fixed = await _read_uploads(uploads, limits), await _read_uploads(held, limits, "fixed")
        return Submission(options.identity, options.config, files, [u.filename for u in uploads], fixed,
                          options.fixed_jobs)
    finally:
        await form.close()


async def _read_uploads(uploads: list, limits: ServeConfig, where: str = "photo") -> list[bytes]:
    files = []
    for i, upload in enumerate(uploads):
        if upload.size is not None and upload.size > limits.max_photo_bytes:
            raise RequestError("photo-too-large", f"photo larger than {limits.max_photo_bytes} bytes", **{where: i},
                               name=upload.filename)
        files.append(await upload.read())
    return files


async def read_submission(request: Any, limits: ServeConfig,
                          charge: Callable[[int], None] | None = None) -> Submission:
    """The request's body as a `Submission`, refusing an oversized or too slow body while it streams in;
    `charge` counts its bytes to the caller's budget as they arrive."""
    import asyncio

    from starlette.requests import Request

    check_declared_length(request.headers, limits.max_request_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json", ""):
        raise RequestError("unsupported-media-type", "send application/json or multipart/form-data")
    bounded = Request(request.scope, receive=guarded_receive(request.receive, limits, charge))
    if kind == "multipart/form-data":
        return await from_multipart(bounded, limits)
    return await asyncio.to_thread(from_json, await bounded.body(), limits)


def decode_photos(files: list[bytes], names: list[str | None], limits: ServeConfig,
                  output: OutputConfig | None = None) -> list[DecodedImage]:
    """Photo files → decoded RGB photos (EXIF-rotated, alpha kept aside, with the profile and the metadata
    `output` keeps), or `RequestError` naming the photo."""
    output = output or OutputConfig()
    decoded = []
    for i, raw in enumerate(files):
        try:
            decoded.append(decode_image(raw, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side,
                                        max_pixels_key="serve.max_image_pixels",
                                        keep_capture_time=output.keep_capture_time,
                                        keep_location=output.keep_location))
        except BadImage as exc:
            raise RequestError("invalid-photo", f"cannot use this photo: {exc}", photo=i,
                               name=names[i] if i < len(names) else None) from None
    return decoded
