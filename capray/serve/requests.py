"""Turn an HTTP request into decoded photos and an effective config, or a clear 4xx.

Validation happens in the ingress, before any GPU time is spent, so a bad photo or a bad override
is refused at once with the photo's index and the reason. A request may tune the attack (`seed`,
`attack`, `cap`) but never what the server owns: the model (loaded once per replica), server-side
paths, the class-image cache, or budgets above the server's own.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import ValidationError

from capray.config import CaprayConfig, ServeConfig, deep_merge
from capray.io.images import BadImage, DecodedImage, decode_image

CLIENT_SECTIONS = ("seed", "attack", "cap")
SERVER_ONLY = (  # paths on the server, and the class-image cache (changing it means generating images)
    "attack.fsmg_model", "attack.surrogate.class_images_dir", "attack.surrogate.class_prompt",
    "attack.surrogate.num_class_images", "attack.surrogate.class_sample_steps",
    "attack.surrogate.class_guidance_scale",
)
CAPPED = (  # cost knobs a request may lower but not raise above the server's value
    "attack.fsmg_train_steps", "attack.surrogate_steps", "attack.surrogate.batch_size",
    "attack.simac.max_select_iters", "attack.simac.samples_per_iter", "cap.ratio_max",
)


class RequestError(Exception):
    """A refused request: HTTP status plus a JSON-able detail naming what is wrong."""

    def __init__(self, status: int, message: str, **context: Any):
        super().__init__(message)
        self.status = status
        self.detail = {"error": message, **context}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _present(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def effective_config(server: CaprayConfig, overrides: dict[str, Any]) -> CaprayConfig:
    """The server's config with a request's overrides applied, or `RequestError(422)`."""
    if not overrides:
        return server
    foreign = sorted(set(overrides) - set(CLIENT_SECTIONS))
    if foreign:
        raise RequestError(422, f"config may override only {list(CLIENT_SECTIONS)}; not {foreign}")
    fixed = [path for path in SERVER_ONLY if _present(overrides, path)]
    if fixed:
        raise RequestError(422, f"set by the server, not per request: {', '.join('config.' + p for p in fixed)}")
    try:
        cfg = CaprayConfig.model_validate(deep_merge(server.model_dump(), overrides))
    except ValidationError as exc:
        errors = [{"loc": "config." + ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        raise RequestError(422, "invalid config overrides", errors=errors) from None
    over = [f"config.{p} = {_get(cfg, p)} > {_get(server, p)}" for p in CAPPED if _get(cfg, p) > _get(server, p)]
    if over:
        raise RequestError(422, f"above this server's limits: {'; '.join(over)}")
    if cfg.attack.total_pgd_steps > server.serve.max_pgd_steps:
        raise RequestError(422, f"{cfg.attack.total_pgd_steps} PGD steps requested; this server allows at most "
                                f"{server.serve.max_pgd_steps}")
    return cfg


def _b64_payload(data: str) -> str:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    return "".join(data.split())


def decode_photos(photos: list[Any], limits: ServeConfig) -> list[DecodedImage]:
    """Base64 photo files → decoded RGB photos (EXIF-rotated, alpha kept aside), or `RequestError`."""
    if len(photos) > limits.max_photos:
        raise RequestError(413, f"{len(photos)} photos; at most {limits.max_photos} per request")
    decoded = []
    for i, photo in enumerate(photos):
        where = {"photo": i, "name": photo.name}
        payload = _b64_payload(photo.data)
        if len(payload) * 3 // 4 > limits.max_photo_bytes:
            raise RequestError(413, f"photo larger than {limits.max_photo_bytes} bytes", **where)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "photo data is not valid base64", **where) from None
        try:
            decoded.append(decode_image(raw, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side))
        except BadImage as exc:
            raise RequestError(422, f"cannot use this photo: {exc}", **where) from None
    return decoded
