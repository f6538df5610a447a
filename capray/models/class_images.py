"""Class images for DreamBooth's prior preservation, generated once per (model, prompt, size) and cached.

Anti-DreamBooth generates them with the base pipeline and keeps them in a shared folder; capray does
the same, as PNG files under the cache root (`capray.models.cache`), written atomically under a file
lock so that several actors on one machine generate them once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capray.config import SurrogateConfig
from capray.models.cache import cache_root, exclusive


def class_image_dir(parts: Any, cfg: SurrogateConfig, resolution: int) -> Path:
    spec = f"{parts.model_id}|{cfg.class_prompt}|{resolution}|{cfg.class_sample_steps}"
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return cache_root(cfg.class_images_dir) / "class-images" / key


def ensure_class_images(parts: Any, cfg: SurrogateConfig, resolution: int) -> torch.Tensor | None:
    """Generate the class images once per (base model, prompt, resolution) and cache them as PNGs.

    Returns (K, 3, r, r) in [-1, 1] on the model's device, or None without prior preservation.
    """
    if not cfg.prior_preservation or cfg.num_class_images == 0:
        return None
    from PIL import Image

    from capray.models.pixels import from_uint8

    folder = class_image_dir(parts, cfg, resolution)
    with exclusive(folder / ".lock"):
        have = sorted(folder.glob("class_*.png"))
        if len(have) < cfg.num_class_images:
            _generate(parts, cfg, resolution, folder, start=len(have))
        files = sorted(folder.glob("class_*.png"))[: cfg.num_class_images]
    batch = torch.stack([from_uint8(np.asarray(Image.open(f).convert("RGB"))) for f in files])
    return batch.to(parts.device)


@torch.no_grad()
def _generate(parts: Any, cfg: SurrogateConfig, resolution: int, folder: Path, start: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from capray.models.seeds import cpu_generator

    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for i in range(start, cfg.num_class_images):
        gen = torch.Generator(parts.device.type).manual_seed(int(cpu_generator("class", i).initial_seed() % (2**31)))
        image = pipe(cfg.class_prompt, height=resolution, width=resolution, num_inference_steps=cfg.class_sample_steps,
                     guidance_scale=cfg.class_guidance_scale, generator=gen).images[0]
        tmp = folder / f".class_{i:05d}.png.tmp"
        image.save(tmp, format="PNG")
        tmp.rename(folder / f"class_{i:05d}.png")
