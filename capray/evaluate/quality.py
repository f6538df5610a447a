"""Image-quality backends: BRISQUE (offline, the `brisque` package's LIVE model) and CLIP-IQA.

CLIP-IQA (Wang et al., AAAI 2023) scores an image by the softmax of its CLIP similarity to the
antonym prompts "Good photo." / "Bad photo.". No wheel ships CLIP weights, so it is available only
when `evaluate.clip_iqa_weights` points at a local transformers-format CLIP directory; otherwise it is
reported unavailable, never computed from random weights.
"""

from __future__ import annotations

import functools

import numpy as np

from capray.evaluate.faces import BackendUnavailable

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")


class BrisqueBackend:
    """BRISQUE (lower = more natural). Works around brisque 0.2.0 returning 1-element arrays as features."""

    name = "brisque"

    def __init__(self):
        try:
            from brisque import BRISQUE
        except ImportError as exc:
            raise BackendUnavailable("the brisque package is not installed") from exc

        class _Brisque(BRISQUE):
            def scale_features(self, features):
                flat = np.array([np.asarray(f, dtype=np.float64).reshape(-1)[0] for f in features])
                lo = np.asarray(self.scale_params["min_"], dtype=np.float64)
                hi = np.asarray(self.scale_params["max_"], dtype=np.float64)
                return -1 + 2.0 / (hi - lo) * (flat - lo)

        self._model = _Brisque(url=False)

    def score(self, rgb: np.ndarray) -> float:
        return float(self._model.score(rgb))


class ClipIQABackend:
    """CLIP-IQA with a local CLIP (transformers `CLIPModel` + `CLIPTokenizer` directory)."""

    name = "CLIP-IQA"

    def __init__(self, weights: str | None, prompts: tuple[str, str] = CLIP_IQA_PROMPTS):
        if not weights:
            raise BackendUnavailable("no CLIP weights configured (set evaluate.clip_iqa_weights to a local CLIP dir)")
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self._model = CLIPModel.from_pretrained(weights).eval()
            tokenizer = CLIPTokenizer.from_pretrained(weights)
        except OSError as exc:
            raise BackendUnavailable(f"cannot load CLIP weights from {weights}: {exc}") from exc
        self._size = int(self._model.config.vision_config.image_size)
        with torch.no_grad():
            ids = tokenizer(list(prompts), padding=True, return_tensors="pt")
            text = self._model.get_text_features(**ids)
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            self._text = text / text.norm(dim=-1, keepdim=True)
        self.weights = weights

    def _pixels(self, rgb: np.ndarray):
        """CLIP preprocessing: shorter side to `size` (bicubic), centre crop, CLIP mean/std."""
        import torch
        from PIL import Image

        img = Image.fromarray(rgb)
        scale = self._size / min(img.size)
        img = img.resize((max(self._size, round(img.width * scale)), max(self._size, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - self._size) // 2, (img.height - self._size) // 2
        img = img.crop((left, top, left + self._size, top + self._size))
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(arr.transpose(2, 0, 1))[None]

    def score(self, rgb: np.ndarray) -> float:
        import torch

        with torch.no_grad():
            image = self._model.get_image_features(pixel_values=self._pixels(rgb))
            image = image if isinstance(image, torch.Tensor) else image.pooler_output
            image = image / image.norm(dim=-1, keepdim=True)
            logits = 100.0 * image @ self._text.T
            return float(logits.softmax(dim=-1)[0, 0])


@functools.lru_cache(maxsize=4)
def load_clip_iqa(weights: str | None) -> ClipIQABackend:
    return ClipIQABackend(weights)
