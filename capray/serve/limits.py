"""Limits enforced before the work they prevent: body bytes, pixels, and what a request's overrides may cost.

Order matters and is the route's: capacity, uploads in flight and the key's own limits (nothing read
yet) → body bytes and their rate while they stream in → override policy (nothing decoded yet) → photo
formats and total pixels from the image headers → decode. Each refusal is a `RequestError` with a
stable, short message naming the limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pydantic import ValidationError

from capray.config import CaprayConfig, ServeConfig, deep_merge
from capray.serve.problems import RequestError

__all__ = ["RequestError"]  # re-exported: every refusal of a limit is one


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
            raise RequestError("server-busy", f"server busy: {self.limit} uploads in progress on this replica, "
                                              "retry later (serve.max_uploads_in_flight)", headers={"Retry-After": "5"})
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


# -- bytes --------------------------------------------------------------------------------------

def too_large(limit: int) -> RequestError:
    return RequestError("body-too-large", f"request body larger than {limit} bytes (serve.max_request_bytes)")


def check_declared_length(headers: Any, limit: int) -> None:
    """Refuse at once when Content-Length already says the body is too large."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)


def too_slow(seen: int, elapsed: float, limits: ServeConfig) -> RequestError:
    return RequestError("body-too-slow", f"request body too slow: {seen} bytes in {elapsed:.0f} s (at least "
                             f"{limits.min_body_bytes_per_s} bytes/s after the first {limits.body_timeout_s:.0f} s; "
                             "serve.min_body_bytes_per_s, serve.body_timeout_s)", headers={"Connection": "close"})


def guarded_receive(receive: Callable[[], Awaitable[dict]], limits: ServeConfig,
                    charge: Callable[[int], None] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that refuses a body over `serve.max_request_bytes` (413) as soon as the bytes
    pass it, and one arriving slower than `body_timeout_s + bytes / min_body_bytes_per_s` (408: a client
    trickling bytes holds an upload slot no longer than that); `charge` counts each chunk to its key."""
    seen, start = 0, clock()

    async def wrapped() -> dict:
        nonlocal seen
        allowed = start + limits.body_timeout_s + seen / limits.min_body_bytes_per_s
        try:
            message = await asyncio.wait_for(receive(), timeout=max(allowed - clock(), 0.0))
        except TimeoutError:
            raise too_slow(seen, clock() - start, limits) from None
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            seen += chunk
            if seen > limits.max_request_bytes:
                raise too_large(limits.max_request_bytes)
            if charge is not None:
                charge(chunk)
        return message

    return wrapped


# -- per API key ---------------------------------------------------------------------------------

class KeyLimits:
    """One API key's share of an ingress replica: its requests in progress here (which, with its pending
    jobs in the store, `serve.max_jobs_per_key` bounds) and a token bucket of the body bytes it sends
    (`serve.max_bytes_per_key_per_min`, refilled continuously). Without them one key holder could fill
    every upload slot and pending job, and starve every other caller.

    Keys come from the server's key ring (a bounded set), so the per-key tables stay small."""

    def __init__(self, limits: ServeConfig, clock: Callable[[], float] = time.monotonic):
        self.max_jobs = limits.max_jobs_per_key
        self.capacity = float(limits.max_bytes_per_key_per_min)
        self.rate = self.capacity / 60.0
        self.clock = clock
        self.active: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def _tokens(self, key: str) -> float:
        tokens, when = self._buckets.get(key, (self.capacity, self.clock()))
        return min(self.capacity, tokens + (self.clock() - when) * self.rate)

    def _over_rate(self, short: float) -> RequestError:
        return RequestError("rate-limited", f"this API key sent more than {int(self.capacity)} bytes in the last "
                                            "minute (serve.max_bytes_per_key_per_min), retry later",
                            headers={"Retry-After": str(max(1, math.ceil(short / self.rate)))})

    def check(self, key: str, pending_jobs: int, declared_bytes: int | None) -> None:
        """Before a body is read: the key's jobs in flight, and room in its byte budget for what it declares."""
        in_flight = pending_jobs + self.active[key]
        if in_flight >= self.max_jobs:
            raise RequestError("too-many-jobs", f"this API key has {in_flight} jobs in progress; at most "
                                                f"{self.max_jobs} (serve.max_jobs_per_key), retry when one finishes",
                               headers={"Retry-After": "30"})
        tokens, needed = self._tokens(key), float(declared_bytes or 1)
        if tokens < needed:
            raise self._over_rate(needed - tokens)

    def charge(self, key: str, nbytes: int) -> None:
        """Count body bytes as they arrive; 429 once the key's budget is spent (the body is not read further)."""
        tokens = self._tokens(key) - nbytes
        self._buckets[key] = (tokens, self.clock())
        if tokens < 0:
            raise self._over_rate(-tokens)

    @contextlib.contextmanager
    def take(self, key: str) -> Iterator[None]:
        """Count one request of `key` in progress on this replica (no await between check and count)."""
        self.active[key] += 1
        try:
            yield
        finally:
            self.active[key] -= 1
            if not self.active[key]:
                del self.active[key]


# -- formats and pixels --------------------------------------------------------------------------

def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an allowed photo's header without decoding the pixels; None when unreadable."""
    from capray.io.images import BadImage, open_photo

    try:
        with open_photo(data) as img:
            return img.size
    except BadImage:
        raise
    except Exception:  # undecodable files are refused with their reason by the decoder
        return None


def check_pixels(files: list[bytes], limits: ServeConfig) -> None:
    """Formats first (415 naming the photo), then the per-request pixel budget from the headers: 16 flat
    40 MP PNGs are refused before any decode. Runs in a worker thread: headers are parsed here."""
    from capray.io.images import UnsupportedFormat

    total = 0
    for i, data in enumerate(files):
        try:
            size = header_size(data)
        except UnsupportedFormat as exc:
            raise RequestError("unsupported-format", f"cannot use this photo: {exc}", photo=i) from None
        if size:
            total += size[0] * size[1]
    if total > limits.max_request_pixels:
        raise RequestError("too-many-pixels", f"{total} pixels in this request; at most {limits.max_request_pixels} "
                                "(serve.max_request_pixels)")


# -- what a request may override -----------------------------------------------------------------

# Every setting under seed/attack/cap/output is either tunable per request or owned by the server;
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
    "attack.simac.feature_reduction",
    "cap.enabled", "cap.start_fraction", "cap.ratio_max", "cap.ratio_mode", "cap.static_ratio", "cap.loss",
    "cap.gram_normalization", "cap.consistency_sign", "cap.search", "cap.score_draw",
    "cap.score_draws",
    "attack.fsmg_batch_size",
    # the robust mode: on costs one transform chain per photo per draw (~10-20 % a step, docs/engine.md);
    # more EOT samples cost a forward + backward each, so `samples` is a ceiling
    "attack.robust.enabled", "attack.robust.samples", "attack.robust.probability", "attack.robust.jpeg_quality",
    "attack.robust.resize_factor", "attack.robust.blur_sigma", "attack.robust.crop_scale", "attack.robust.flip",
    "output.format", "output.keep_capture_time", "output.keep_location",  # how the caller's own photos come back
}
SERVER_ONLY = {  # server paths, memory layout, and the class-image cache (changing it means generating images)
    "attack.fsmg_model", "attack.surrogate.master_weights", "attack.surrogate.class_prompt",
    "attack.surrogate.num_class_images", "attack.surrogate.class_sample_steps",
    "attack.surrogate.class_guidance_scale", "attack.surrogate.class_images_dir", "attack.surrogate.offload_main",
    "attack.image_batch_size", "cap.score_image_batch_size",  # device memory per forward: the replica's to size
    "cap.candidate_batch_size",  # fewer candidates per call only means more, smaller forwards: slower, never cheaper
}
CEILINGS = (  # cost (time or memory) grows with the value: a request may lower it, not raise it
    "attack.fsmg_train_steps", "attack.surrogate_steps", "attack.surrogate.batch_size",
    "attack.simac.max_select_iters", "attack.simac.samples_per_iter", "cap.ratio_max",
    "cap.score_draws", "attack.fsmg_batch_size", "attack.robust.samples",
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
        raise RequestError("invalid-config", "config must be an object")
    leaves = _leaves(overrides)
    fixed = sorted(p for p in leaves if p not in TUNABLE)
    if fixed:
        raise RequestError("config-not-settable", f"not settable per request (the server owns them): "
                                f"{', '.join('config.' + p for p in fixed)}")
    try:
        cfg = CaprayConfig.model_validate(deep_merge(server.model_dump(), overrides))
    except ValidationError as exc:
        errors = [{"loc": "config." + ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        raise RequestError("invalid-config", "invalid config overrides", errors=errors) from None
    over = [f"config.{p} = {_get(cfg, p)} > {_get(server, p)}" for p in CEILINGS if _get(cfg, p) > _get(server, p)]
    over += [f"config.{p} = {_get(cfg, p)} < {_get(server, p)}" for p in FLOORS if _get(cfg, p) < _get(server, p)]
    over += [f"config.{p} = {_get(cfg, p)!r} costs more than this server's {_get(server, p)!r}"
             for p, order in ORDERED.items() if order.index(_get(cfg, p)) > order.index(_get(server, p))]
    if training_steps(cfg) > training_steps(server):
        over.append(f"{training_steps(cfg)} surrogate training steps > this server's {training_steps(server)}")
    if over:
        raise RequestError("over-server-limits", f"above this server's limits: {'; '.join(over)}")
    if cfg.attack.total_pgd_steps > server.serve.max_pgd_steps:
        raise RequestError("over-server-limits", f"{cfg.attack.total_pgd_steps} PGD steps requested; this server "
                                                 f"allows at most {server.serve.max_pgd_steps}")
    return cfg
