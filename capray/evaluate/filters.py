"""Pixel-filter purifications: what anyone can run on a downloaded photo, no model needed.

JPEG, Gaussian blur and resize are the re-upload a platform does anyway; median and bilateral
filtering, added-noise-then-denoise and total-variation minimisation (MetaCloak evaluates TVM) are the
"photoshop filters" recent work shows strip most protections. Pillow and scikit-image (core
dependencies) do the work, on the 8-bit photo, so every filter is deterministic.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from capray.evaluate.purification import Transform, photo_seed
from capray.models.pixels import unit_to_uint8

BILATERAL_SPATIAL_PX = 1.5
NLM_PATCH, NLM_DISTANCE, NLM_H = 5, 6, 0.8  # skimage's recommended fast-mode settings: h = 0.8 σ


class Jpeg(Transform):
    kind, form, rule, integer = "jpeg", "jpeg:Q", "Q an integer quality in 1..100", True

    @classmethod
    def valid(cls, value: float) -> bool:
        return 1 <= value <= 100

    @property
    def label(self) -> str:
        return f"JPEG q{int(self.value)}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"quality": int(self.value), "subsampling": "4:2:0", "encoder": "Pillow (libjpeg)"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=int(self.value), subsampling="4:2:0")
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8).copy()


class GaussianBlur(Transform):
    kind, form, rule = "blur", "blur:SIGMA", "SIGMA the Gaussian's standard deviation in pixels, in (0, 50]"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 < value <= 50

    @property
    def label(self) -> str:
        return f"blur σ{self.value:g}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"sigma_px": self.value, "filter": "Pillow GaussianBlur"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=self.value)), dtype=np.uint8)


class Resize(Transform):
    kind, form, rule = "resize", "resize:F", "F the downscale factor in (0, 1)"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 < value < 1

    @property
    def label(self) -> str:
        return f"resize ×{self.value:g}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"factor": self.value, "filter": "bicubic", "then": "back up to the original size"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        img = Image.fromarray(rgb)
        small = (max(1, round(img.width * self.value)), max(1, round(img.height * self.value)))
        return np.asarray(img.resize(small, Image.BICUBIC).resize(img.size, Image.BICUBIC), dtype=np.uint8)


class Median(Transform):
    kind, form, rule, integer = "median", "median:K", "K an odd window size in 3..15", True

    @classmethod
    def valid(cls, value: float) -> bool:
        return 3 <= value <= 15 and int(value) % 2 == 1

    @property
    def label(self) -> str:
        return f"median {int(self.value)}×{int(self.value)}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"window_px": int(self.value), "filter": "Pillow MedianFilter (per channel)"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.MedianFilter(size=int(self.value))), dtype=np.uint8)


class Bilateral(Transform):
    kind, form, rule = "bilateral", "bilateral:SIGMA_COLOR", "SIGMA_COLOR the range σ on the 0..255 scale, in (0, 255]"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 < value <= 255

    @property
    def label(self) -> str:
        return f"bilateral σc{self.value:g}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"sigma_color_255": self.value, "sigma_spatial_px": BILATERAL_SPATIAL_PX,
                "filter": "skimage denoise_bilateral"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_bilateral

        out = denoise_bilateral(rgb / 255.0, sigma_color=self.value / 255.0, sigma_spatial=BILATERAL_SPATIAL_PX,
                                mode="edge", channel_axis=-1)
        return unit_to_uint8(out)


class NoiseDenoise(Transform):
    kind, form = "noise-denoise", "noise-denoise:SIGMA"
    rule = "SIGMA the added noise's σ on the 0..255 scale, in (0, 100]"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 < value <= 100

    @property
    def label(self) -> str:
        return f"noise σ{self.value:g} + NL-means"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"noise_sigma_255": self.value, "denoiser": "skimage denoise_nl_means (fast mode)",
                "h": f"{NLM_H:g}·σ", "patch_px": NLM_PATCH, "distance_px": NLM_DISTANCE,
                "seed": "from the photo's pixels"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        sigma = self.value / 255.0
        rng = np.random.default_rng(photo_seed(rgb, "purify", self.spec))
        noisy = np.clip(rgb / 255.0 + rng.normal(0.0, sigma, rgb.shape), 0.0, 1.0)
        out = denoise_nl_means(noisy, h=NLM_H * sigma, sigma=sigma, patch_size=NLM_PATCH,
                               patch_distance=NLM_DISTANCE, fast_mode=True, channel_axis=-1)
        return unit_to_uint8(out)


class TotalVariation(Transform):
    kind, form, rule = "tvm", "tvm:W", "W the total-variation weight (on [0, 1] images), in (0, 10]"

    @classmethod
    def valid(cls, value: float) -> bool:
        return 0 < value <= 10

    @property
    def label(self) -> str:
        return f"TVM w{self.value:g}"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"weight": self.value, "filter": "skimage denoise_tv_chambolle"}

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_tv_chambolle

        return unit_to_uint8(denoise_tv_chambolle(rgb / 255.0, weight=self.value, channel_axis=-1))


FILTERS: tuple[type[Transform], ...] = (Jpeg, GaussianBlur, Resize, Median, Bilateral, NoiseDenoise, TotalVariation)
