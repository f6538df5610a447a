"""`Protector`: the public Python API — models loaded once, called on the photos of one person.

    protector = Protector.from_pretrained("stabilityai/stable-diffusion-2-1-base")
    result = protector(["me/1.jpg", "me/2.jpg"], identity="me")
    result.images[0].save("1.protected.png")          # or: result.file(0).data, as `capray protect` writes it

It is the diffusers-style face of the engine (`capray.attack.api.protect_arrays`) and the one way every
front door reaches it: the batch job's actors, Serve's `Protector` deployment, `capray evaluate` and the
benchmarks all hold a `Protector`, so a group protected through any of them with the same config and
seed gets the same pixels. Photos may be PIL images, (H, W, 3) uint8 arrays or local file paths; they
are protected as they are displayed (EXIF orientation applied) and come back at their own sizes. An
alpha channel is not protected (an attacker's `convert("RGB")` drops it) and is re-attached unchanged.
A photo's colour profile comes back with it (the values are protected in the photo's own colour space),
and `file(i)` encodes it as the batch job writes it: `output.format`, profile and kept metadata included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from capray.attack.api import ProtectionRecord, protect_arrays
from capray.config import CaprayConfig, deep_merge, load_config
from capray.io.images import BadImage, DecodedImage, EncodedPhoto, decode_image, decoded_from_pil, encode_photo

if TYPE_CHECKING:
    from PIL import Image

    from capray.attack.engine import Models

Photo = Union["Image.Image", np.ndarray, str, os.PathLike]


@dataclass
class ProtectedPhotos:
    """What one call returns: the protected photos (same order and sizes) and the group's record.

    Unpacks as `images, record = protector(photos)`.
    """

    arrays: list[np.ndarray]  # (H, W, 3) uint8, the protected RGB pixels
    record: ProtectionRecord
    alphas: list[np.ndarray | None] = field(default_factory=list)  # per photo, re-attached unchanged
    profiles: list[bytes | None] = field(default_factory=list)  # per photo, its RGB ICC profile (None: sRGB)
    exifs: list[bytes | None] = field(default_factory=list)  # per photo, the EXIF the metadata policy keeps
    format: str = "png"  # output.format: what `file` encodes

    def _per_photo(self, values: list[Any]) -> list[Any]:
        return values or [None] * len(self.arrays)

    @property
    def images(self) -> list[Image.Image]:
        """PIL images (RGBA where the input had transparency), each with its colour profile in
        `info["icc_profile"]` (PNG keeps it on `save`); save them losslessly (PNG/WebP lossless)."""
        from PIL import Image

        images = []
        for rgb, a, icc in zip(self.arrays, self._per_photo(self.alphas), self._per_photo(self.profiles)):
            img = Image.fromarray(np.dstack([rgb, a]) if a is not None else rgb)
            if icc:
                img.info["icc_profile"] = icc
            images.append(img)
        return images

    def file(self, index: int) -> EncodedPhoto:
        """Photo `index` as `capray protect` writes it (`.data`, `.format`): lossless `output.format`, with
        its colour profile and the metadata `output.keep_*` keeps."""
        return encode_photo(self.arrays[index], self._per_photo(self.alphas)[index], fmt=self.format,
                            icc=self._per_photo(self.profiles)[index], exif=self._per_photo(self.exifs)[index])

    def __iter__(self) -> Iterator[Any]:
        yield self.images
        yield self.record


def as_config(config: CaprayConfig | dict[str, Any] | str | os.PathLike | None, *, model: str | None = None,
              preset: str | None = None) -> CaprayConfig:
    """A config from what a caller has: a `CaprayConfig`, overrides, or a YAML/JSON file; `model` wins."""
    flags = {"model": {"sd": model}} if model else {}
    if isinstance(config, CaprayConfig):
        if preset:
            raise ValueError("preset applies to overrides or a config file, not to a finished CaprayConfig")
        return CaprayConfig.model_validate(deep_merge(config.model_dump(), flags)) if flags else config
    if config is None or isinstance(config, dict):
        return load_config(preset=preset, overrides=deep_merge(config or {}, flags))
    return load_config(config, preset=preset, overrides=flags)


class Protector:
    """SD parts and the style network resident on the device; one call per identity group."""

    def __init__(self, config: CaprayConfig, models: Models | None):
        """`models`: from `capray.attack.engine.load_models(config.model)` (None only for stand-ins that
        override `__call__`'s engine, e.g. the batch job's tests)."""
        self.config = config
        self.models = models

    @classmethod
    def from_pretrained(cls, model: str | None = None,
                        config: CaprayConfig | dict[str, Any] | str | os.PathLike | None = None, *,
                        preset: str | None = None) -> Protector:
        """Load the models: `model` is a hub id, a local SD-format directory or "tiny" (default: the
        config's `model.sd`, SD 2.1 base); `config` a `CaprayConfig`, a dict of overrides or a YAML/JSON
        path; `preset` ("smoke", "paper") is applied under `config`. Nothing is downloaded here unless
        the hub's cache lacks the weights and the network allows it (`capray models fetch` first)."""
        return cls.from_config(as_config(config, model=model, preset=preset))

    @classmethod
    def from_config(cls, config: CaprayConfig) -> Protector:
        from capray.attack.engine import load_models

        return cls(config, load_models(config.model))

    def __call__(self, photos: Sequence[Photo], identity: str = "person", *,
                 fixed: Sequence[Photo] | None = None,
                 config: CaprayConfig | None = None, progress: Callable[[int, int], None] | None = None,
                 evaluator_factory: Any = None) -> ProtectedPhotos:
        """Protect the photos of ONE person (CAP ties them together: do not mix people in a call).

        `identity` seeds every random draw, so the same photos, identity, config and seed give the same
        pixels. `fixed`: this person's photos that are already published *protected* (append mode):
        they join CAP's group as they are and are never changed — a published photo re-perturbed
        differently would let an attacker average the two copies — and only `photos` come back.
        `config`: a per-call config (e.g. a request's budget) for the same models; `progress(done,
        total)` is called after every PGD step; `evaluator_factory`: where λ candidates are scored
        (`capray.distributed` shards them over actors; default: in this process).
        """
        cfg = config or self.config
        if cfg.model != self.config.model:
            raise ValueError("this Protector holds different models than the call's config asks for "
                             "(model.* must match; load another Protector)")
        decoded = [self._decode(photo, cfg) for photo in photos]
        held = [self._decode(photo, cfg).rgb for photo in fixed or []]
        protected, record = protect_arrays([d.rgb for d in decoded], cfg, identity, self.models, progress,
                                           evaluator_factory, fixed=held)
        for d in decoded:
            record.notes.extend(d.notes)
        return ProtectedPhotos(protected, record, [d.alpha for d in decoded], [d.icc for d in decoded],
                               [d.exif for d in decoded], cfg.output.format)

    @staticmethod
    def _decode(photo: Photo, cfg: CaprayConfig) -> DecodedImage:
        """Any accepted photo → displayed-orientation RGB uint8 (+ alpha), with the batch job's limits."""
        if isinstance(photo, np.ndarray):
            if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
                raise BadImage(f"expected an (H, W, 3) uint8 array, got {photo.shape} {photo.dtype}")
            return DecodedImage(np.ascontiguousarray(photo), None, [])
        limits = {"max_pixels": cfg.batch.max_image_pixels, "min_side": cfg.batch.min_image_side,
                  "keep_capture_time": cfg.output.keep_capture_time, "keep_location": cfg.output.keep_location}
        if isinstance(photo, (str, os.PathLike)):
            path = Path(photo)
            if path.stat().st_size > cfg.batch.max_file_bytes:
                raise BadImage(f"{path.name}: over batch.max_file_bytes={cfg.batch.max_file_bytes}")
            return decode_image(path.read_bytes(), **limits)
        if hasattr(photo, "mode") and hasattr(photo, "size"):  # a PIL image
            return decoded_from_pil(photo, **limits)
        raise TypeError(f"a photo must be a PIL image, an (H, W, 3) uint8 array or a path, not {type(photo).__name__}")
