"""Purifications that need model weights: noisy upscaling and diffusion purification (DiffPure-style).

capray cannot ship these weights, so each needs its config key (`evaluate.upscaler_model`,
`evaluate.purifier_model`). Without it, or when the weights do not load, the purification is reported
as unavailable with how to supply them; nothing is approximated in its place. With them it really runs:
the diffusers pipeline is loaded once per identity task, on the attacker's device, and every photo is
purified with a generator seeded from (run seed, spec, the photo's pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from capray.evaluate.purification import Transform, Unavailable, check_output, check_rgb, photo_seed
from capray.models.pixels import unit_to_uint8

UPSCALE_FACTOR = 4
UPSCALE_MAX_SIDE = 512  # the ×4 upscaler's training output size: larger photos are first brought down to it
UPSCALE_STEPS = 50
DIFFPURE_STEPS = 50  # the sampler's schedule; strength s runs its last ⌊s · 50⌋ steps


def _multiple_of_8(n: float) -> int:
    return max(8, int(round(n / 8)) * 8)


def _back_to_photo(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A pipeline's [0, 1] float output back to 8 bits at the photo's own size."""
    return np.asarray(Image.fromarray(unit_to_uint8(image)).resize(size, Image.BICUBIC), dtype=np.uint8)


class ModelTransform(Transform):
    """A purification that runs a diffusers pipeline loaded from `evaluate.<config_key>`."""

    config_key: ClassVar[str] = ""
    hub_model: ClassVar[str] = ""  # the weights to point the config key at
    needs: ClassVar[str] = ""

    def how_to(self) -> str:
        key = f"evaluate.{self.config_key}"
        return (f"download {self.hub_model} (e.g. `hf download {self.hub_model} --local-dir DIR` where the hub is "
                f"reachable) and set {key}=DIR (`--set {key}=DIR`)")

    def unavailable(self, ev: Any) -> str | None:
        """Known where the run is planned: the key is not set. Whether its directory exists is asked where
        the purifier loads (`load`, in the identity task): on a cluster only the workers may mount it."""
        if not getattr(ev, self.config_key):
            return f"needs {self.needs}; evaluate.{self.config_key} is not set: {self.how_to()}"
        return None

    def missing(self, ev: Any) -> str | None:
        """`unavailable`, or a local path that is not a directory here."""
        from capray.models.cache import looks_like_path

        where = getattr(ev, self.config_key)
        if where and looks_like_path(where) and not Path(where).expanduser().is_dir():
            return f"evaluate.{self.config_key} {where!r}: no such directory; {self.how_to()}"
        return self.unavailable(ev)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        raise TypeError(f"transform {self.spec!r} runs a model: use Purifiers (it loads {self.needs})")

    def load(self, cfg: Any, device: Any, dtype: Any) -> LoadedPurifier:
        reason = self.missing(cfg.evaluate)
        if reason:
            raise Unavailable(reason)
        where = str(Path(getattr(cfg.evaluate, self.config_key)).expanduser())
        try:
            pipe = self.pipeline(where, dtype).to(device)
        except Exception as exc:  # noqa: BLE001 - whatever stops the weights loading, the answer is the same
            raise Unavailable(f"evaluate.{self.config_key} {where!r} did not load ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); {self.how_to()}") from exc
        pipe.set_progress_bar_config(disable=True)
        return LoadedPurifier(self, pipe, int(cfg.seed), device)

    def pipeline(self, where: str, dtype: Any) -> Any:
        raise NotImplementedError

    def run(self, pipe: Any, rgb: np.ndarray, generator: Any) -> np.ndarray:
        raise NotImplementedError


class LoadedPurifier:
    """A model purification with its pipeline loaded: photo → purified photo, seeded per photo."""

    def __init__(self, transform: ModelTransform, pipe: Any, seed: int, device: Any):
        self.transform, self.pipe, self.seed, self.device = transform, pipe, seed, device

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        check_rgb(rgb, self.transform.spec)
        seed = photo_seed(rgb, self.seed, self.transform.spec)
        generator = torch.Generator(torch.device(self.device).type).manual_seed(seed)
        with torch.no_grad():
            return check_output(self.transform.run(self.pipe, rgb, generator), rgb, self.transform.spec)


class NoisyUpscale(ModelTransform):
    """Noisy upscaling: down ×4, then Stable Diffusion's ×4 upscaler re-draws the detail (and the noise)."""

    kind, form, rule, integer = "upscale", "upscale:NOISE", "NOISE the upscaler's integer noise level in 0..350", True
    config_key, hub_model, needs = "upscaler_model", "stabilityai/stable-diffusion-x4-upscaler", "the SD ×4 upscaler"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 <= value <= 350

    @property
    def label(self) -> str:
        return f"noisy upscale ×4 (noise {int(self.value)})"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"noise_level": int(self.value), "downscale": UPSCALE_FACTOR, "max_side_px": UPSCALE_MAX_SIDE,
                "steps": UPSCALE_STEPS, "prompt": "", "guidance_scale": 0, "weights": "evaluate.upscaler_model"}

    def pipeline(self, where: str, dtype: Any) -> Any:
        from diffusers import StableDiffusionUpscalePipeline

        return StableDiffusionUpscalePipeline.from_pretrained(where, torch_dtype=dtype)

    def run(self, pipe: Any, rgb: np.ndarray, generator: Any) -> np.ndarray:
        img = Image.fromarray(rgb)
        scale = min(1.0, UPSCALE_MAX_SIDE / min(img.size)) / UPSCALE_FACTOR
        low = img.resize((_multiple_of_8(img.width * scale), _multiple_of_8(img.height * scale)), Image.BICUBIC)
        out = pipe(prompt="", image=low, noise_level=int(self.value), num_inference_steps=UPSCALE_STEPS,
                   guidance_scale=0.0, generator=generator, output_type="np").images[0]
        return _back_to_photo(out, img.size)


class DiffPure(ModelTransform):
    """Diffusion purification (DiffPure-style): noise the photo to strength s, denoise with an empty prompt."""

    kind, form = "diffpure", "diffpure:STRENGTH"
    rule = f"STRENGTH the img2img strength t*/T in {1 / DIFFPURE_STEPS:g}..1 (at least one denoising step)"
    config_key, hub_model = "purifier_model", "stabilityai/stable-diffusion-2-1-base"
    needs = "a Stable Diffusion model (SD-format directory)"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 1 / DIFFPURE_STEPS <= value <= 1

    @property
    def label(self) -> str:
        return f"DiffPure s{self.value:g}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"strength": self.value, "sampler": "DDPM", "steps": DIFFPURE_STEPS, "prompt": "",
                "guidance_scale": 1.0, "side_px": "the model's native resolution", "weights": "evaluate.purifier_model"}

    def pipeline(self, where: str, dtype: Any) -> Any:
        from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline

        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(where, torch_dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # stochastic, like DiffPure's reverse SDE
        return pipe

    def run(self, pipe: Any, rgb: np.ndarray, generator: Any) -> np.ndarray:
        img = Image.fromarray(rgb)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        scale = native / min(img.size)
        work = img.resize((_multiple_of_8(img.width * scale), _multiple_of_8(img.height * scale)), Image.BICUBIC)
        out = pipe(prompt="", image=work, strength=self.value, num_inference_steps=DIFFPURE_STEPS,
                   guidance_scale=1.0, generator=generator, output_type="np").images[0]
        return _back_to_photo(out, img.size)


MODELS: tuple[type[ModelTransform], ...] = (NoisyUpscale, DiffPure)


class Purifiers:
    """The purifications one identity task applies; each model is loaded on first use and kept until close()."""

    def __init__(self, cfg: Any, device: Any, dtype: Any):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._runners: dict[Transform, Any] = {}
        self._unavailable: dict[Transform, str] = {}

    def apply(self, transform: Transform, photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every photo purified; raises Unavailable when the model cannot run here (remembered: no retry)."""
        if transform in self._unavailable:
            raise Unavailable(self._unavailable[transform])
        if transform not in self._runners:
            try:
                self._runners[transform] = transform.load(self.cfg, self.device, self.dtype)
            except Unavailable as exc:
                self._unavailable[transform] = str(exc)
                raise
        run = self._runners[transform]
        return {key: run(rgb) for key, rgb in photos.items()}

    def close(self) -> None:
        self._runners.clear()
