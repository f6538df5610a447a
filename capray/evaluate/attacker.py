"""The attacker: DreamBooth on one identity's photos, then generation from the personalised model.

Full fine-tuning reuses the engine's surrogate trainer (fp32 master weights, prior preservation with
cached class images, seeded noise), i.e. Anti-DreamBooth's evaluation recipe: batch 2, lr 5e-7,
1000 steps, text encoder trained. `lora=True` trains rank-r LoRA adapters (peft) on the UNet's
attention projections instead, as Anti-DB's 2025 LoRA variant does. Generation uses diffusers'
StableDiffusionPipeline built from the trained components with a DDIM sampler, one seeded generator
per batch, so the same config + seed gives the same images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from capray.attack.randomness import derive_seed
from capray.attack.surrogate import Surrogate, train_surrogate
from capray.config import CaprayConfig, EvaluateConfig, SurrogateConfig
from capray.models.class_images import ensure_class_images
from capray.models.pixels import unit_to_uint8


def attacker_surrogate_config(cfg: CaprayConfig) -> SurrogateConfig:
    """The engine's DreamBooth settings with the evaluation's step size, batch and prior."""
    ev = cfg.evaluate
    return cfg.attack.surrogate.model_copy(update={
        "learning_rate": ev.learning_rate, "batch_size": ev.batch_size,
        "prior_preservation": ev.prior_preservation, "num_class_images": ev.num_class_images,
        "train_text_encoder": True,
    })


def to_model_resolution(photos: list[np.ndarray], resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` and centre-crop (DreamBooth's preprocessing); (N,3,r,r) in [-1,1]."""
    # Deliberately not the engine's `resize_center_crop`: the attacker is Anti-DreamBooth's train_dreambooth.py
    # (torchvision Resize + CenterCrop on the PIL image: Pillow's bilinear, re-quantised to uint8), not the
    # differentiable float resize the perturbation was optimised through; scoring through that would flatter it.
    out = []
    for rgb in photos:
        img = Image.fromarray(rgb)
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.BILINEAR)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def personalize(parts: Any, cfg: CaprayConfig, photos: list[np.ndarray], seed_parts: tuple[Any, ...],
                class_images: torch.Tensor | None = None) -> Surrogate:
    """DreamBooth on `photos` (HxWx3 uint8). Returns the trained (UNet, text encoder)."""
    ev = cfg.evaluate
    scfg = attacker_surrogate_config(cfg)
    instances = to_model_resolution(photos, cfg.model.resolution).to(parts.device)
    if class_images is None:
        class_images = ensure_class_images(parts, scfg, cfg.model.resolution)
    surrogate = Surrogate.from_parts(parts)
    if ev.lora:
        return _train_lora(surrogate, parts, instances, class_images, scfg, ev, seed_parts)
    return train_surrogate(surrogate, parts, instances, class_images, scfg, ev.instance_prompt, ev.train_steps,
                           seed_parts)


def _train_lora(surrogate: Surrogate, parts: Any, instances: torch.Tensor, class_images: torch.Tensor | None,
                scfg: SurrogateConfig, ev: EvaluateConfig, seed_parts: tuple[Any, ...]) -> Surrogate:
    """LoRA DreamBooth: only the adapters train (text encoder frozen), same loss and noise draws."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise RuntimeError("evaluate.lora=true needs the peft package (pip install peft)") from exc
    unet = surrogate.unet
    unet.add_adapter(LoraConfig(r=ev.lora_rank, lora_alpha=ev.lora_rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapters = [p for n, p in unet.named_parameters() if "lora_" in n]
    return train_surrogate(surrogate, parts, instances, class_images, scfg, ev.instance_prompt, ev.train_steps,
                           (*seed_parts, "lora"), trainable=adapters, learning_rate=ev.lora_learning_rate)


@torch.no_grad()
def generate(parts: Any, surrogate: Surrogate, cfg: CaprayConfig,
             seed_parts: tuple[Any, ...]) -> dict[str, list[np.ndarray]]:
    """`images_per_prompt` images for each prompt (HxWx3 uint8), seeded per (prompt, batch)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ev = cfg.evaluate
    unet = surrogate.unet.to(parts.dtype)  # the fp32 masters are no longer needed; match the VAE's dtype
    text = surrogate.text_encoder.to(parts.dtype)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=text, tokenizer=parts.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, list[np.ndarray]] = {}
    res = cfg.model.resolution
    for p_idx, prompt in enumerate(ev.prompts):
        images: list[np.ndarray] = []
        for b_idx, start in enumerate(range(0, ev.images_per_prompt, ev.generation_batch_size)):
            n = min(ev.generation_batch_size, ev.images_per_prompt - start)
            gen = torch.Generator(parts.device.type).manual_seed(
                derive_seed(cfg.seed, *seed_parts, "generate", p_idx, b_idx) % (2**63))
            result = pipe(prompt, height=res, width=res, num_inference_steps=ev.sample_steps,
                          guidance_scale=ev.guidance_scale, num_images_per_prompt=n, generator=gen,
                          output_type="np")
            images += [unit_to_uint8(a) for a in result.images]
        out[prompt] = images
    return out
