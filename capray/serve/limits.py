"""Limits enforced before the work they prevent: body bytes, pixels, and what a request's overrides may cost.

Order matters and is the route's: capacity and uploads in flight (nothing read yet) → body bytes
while they stream in → override policy (nothing decoded yet) → total pixels from the image headers →
decode. Each refusal is a `RequestError` with a stable, short message naming the limit.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pydantic import ValidationError

from capray.config import CaprayConfig, ServeConfig, deep_merge


class RequestError(Exception):
    """A refused request: HTTP status plus a JSON-able detail naming what is wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **context: Any):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.detail = {"error": message, **context}


# -- uploads in flight --------------------------------------------------------------------------

class UploadSlots:
    """A per-replica bound on request bodies being read: the pending-job count cannot see them, so without
    it many parallel 100 MB uploads could all stream into one replica's memory. Full means 503, not a wait
    (a waiting upload still holds its connection, and the client knows best when to retry)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.used >= self.limit:  # no await between the check and the count: one event loop, no race
            raise RequestError(503, f"server busy: {self.limit} uploads in progress on this replica, retry later "
                                    "(serve.max_uploads_in_flight)", headers={"Retry-After": "5"})
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


# -- bytes --------------------------------------------------------------------------------------

def too_large(limit: int) -> RequestError:
    return RequestError(413, f"request body larger than {limit} bytes (serve.max_request_bytes)")


def check_declared_length(headers: Any, limit: int) -> None:
    """Refuse at once when Content-Length already says the body is too large."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)


def limited_receive(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that raises 413 as soon as more than `limit` body bytes have arrived."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return wrapped


# -- pixels -------------------------------------------------------------------------------------

def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding the pixels; None when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # undecodable files are refused with their reason by the decoder
        return None


def check_pixels(files: list[bytes], limits: ServeConfig) -> None:
    """The per-request pixel budget, from headers: 16 flat 40 MP PNGs are refused before any decode."""
    total = 0
    for data in files:
        size = header_size(data)
        if size:
            total += size[0] * size[1]
    if total > limits.max_request_pixels:
        raise RequestError(413, f"{total} pixels in this request; at most {limits.max_request_pixels} "
                                "(serve.max_request_pixels)")


# -- what a request may override -----------------------------------------------------------------

# Every setting under seed/attack/cap is either tunable per request or owned by the server;
# tests check the two lists cover the config, so a new knob needs a decision here.
TUNABLE = {
    "seed",
    "attack.method", "attack.eps", "attack.alpha", "attack.instance_prompt", "attack.pgd_steps",
    "attack.fsmg_train_steps", "attack.outer_loops", "attack.surrogate_steps", "attack.adv_steps",
    "attack.surrogate.learning_rate", "attack.surrogate.weight_decay", "attack.surrogate.train_text_encoder",
    "attack.surrogate.batch_size", "attack.surrogate.max_grad_norm", "attack.surrogate.prior_preservation",
    "attack.surrogate.prior_loss_weight",
    "attack.simac.max_select_iters", "attack.simac.samples_per_iter", "attack.simac.delta_t",
    "attack.simac.keep_timesteps", "attack.simac.feature_weight", "attack.simac.feature_detach",
    "cap.enabled", "cap.start_fraction", "cap.ratio_max", "cap.ratio_mode", "cap.static_ratio", "cap.loss",
    "cap.gram_normalization", "cap.search", "cap.candidate_batch_size", "cap.score_draw", "cap.score_draws",
    "attack.fsmg_batch_size",
}
SERVER_ONLY = {  # server paths, memory layout, and the class-image cache (changing it means generating images)
    "attack.fsmg_model", "attack.surrogate.master_weights", "attack.surrogate.class_prompt",
    "attack.surrogate.num_class_images", "attack.surrogate.class_sample_steps",
    "attack.surrogate.class_guidance_scale", "attack.surrogate.class_images_dir", "attack.surrogate.offload_main",
    "attack.image_batch_size", "cap.score_image_batch_size",  # device memory per forward: the replica's to size
}
CEILINGS = (  # cost (time or memory) grows with the value: a request may lower it, not raise it
    "attack.fsmg_train_steps", "attack.surrogate_steps", "attack.surrogate.batch_size",
    "attack.simac.max_select_iters", "attack.simac.samples_per_iter", "cap.ratio_max", "cap.candidate_batch_size",
    "cap.score_draws", "attack.fsmg_batch_size",
)
FLOORS = ("cap.start_fraction",)  # CAP searches λ from k̂ = start_fraction·K on: lowering it searches more steps
ORDERED = {  # choices from cheap to expensive: a request may pick the server's or a cheaper one
    "cap.search": ["fast", "reference"],  # reference: every candidate's gradient, ≈100× the scoring work
    "cap.score_draw": ["gradient", "fresh", "independent"],  # independent: no two candidates share a score
    "cap.ratio_mode": ["static", "dynamic"],
    "cap.enabled": [False, True],
    "attack.surrogate.prior_preservation": [False, True],
    "attack.surrogate.train_text_encoder": [False, True],
}


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += _leaves(value, path + ".") if isinstance(value, dict) else [path]
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def training_steps(cfg: CaprayConfig) -> int:
    """Surrogate training steps a run takes: FSMG trains once, ASPL/SimAC every outer loop."""
    a = cfg.attack
    return a.fsmg_train_steps if a.method == "fsmg" else a.outer_loops * a.surrogate_steps


def effective_config(server: CaprayConfig, overrides: dict[str, Any]) -> CaprayConfig:
    """The server's config with a request's overrides applied, or `RequestError(422)`."""
    if not overrides:
        return server
    if not isinstance(overrides, dict):
        raise RequestError(422, "config must be an object")
    leaves = _leaves(overrides)
    fixed = sorted(p for p in leaves if p not in TUNABLE)
    if fixed:
        raise RequestError(422, f"not settable per request (the server owns them): "
                                f"{', '.join('config.' + p for p in fixed)}")
    try:
        cfg = CaprayConfig.model_validate(deep_merge(server.model_dump(), overrides))
    except ValidationError as exc:
        errors = [{"loc": "config." + ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        raise RequestError(422, "invalid config overrides", errors=errors) from None
    over = [f"config.{p} = {_get(cfg, p)} > {_get(server, p)}" for p in CEILINGS if _get(cfg, p) > _get(server, p)]
    over += [f"config.{p} = {_get(cfg, p)} < {_get(server, p)}" for p in FLOORS if _get(cfg, p) < _get(server, p)]
    over += [f"config.{p} = {_get(cfg, p)!r} costs more than this server's {_get(server, p)!r}"
             for p, order in ORDERED.items() if order.index(_get(cfg, p)) > order.index(_get(server, p))]
    if training_steps(cfg) > training_steps(server):
        over.append(f"{training_steps(cfg)} surrogate training steps > this server's {training_steps(server)}")
    if over:
        raise RequestError(422, f"above this server's limits: {'; '.join(over)}")
    if cfg.attack.total_pgd_steps > server.serve.max_pgd_steps:
        raise RequestError(422, f"{cfg.attack.total_pgd_steps} PGD steps requested; this server allows at most "
                                f"{server.serve.max_pgd_steps}")
    return cfg
