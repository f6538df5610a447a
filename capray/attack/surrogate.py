"""DreamBooth surrogate training (FSMG once, ASPL/SimAC every outer loop) and the class-image cache.

Weights are trained in fp32 ("fp32 master weights"): Anti-DreamBooth casts the surrogate to bf16 and
steps it at lr 5e-7, which is below bf16's resolution for most weights, so it barely moves. On CUDA
the forward runs under autocast in the configured dtype.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capray.attack.losses import reconstruction_loss
from capray.attack.metrics import from_uint8
from capray.attack.randomness import cpu_generator, draw_noise
from capray.config import SurrogateConfig
from capray.models.sd import encode_prompt


@dataclass
class Surrogate:
    """A trainable (UNet, text encoder) pair in fp32."""

    unet: Any
    text_encoder: Any

    @classmethod
    def from_parts(cls, parts: Any) -> "Surrogate":
        unet = copy.deepcopy(parts.unet).to(parts.master_dtype).requires_grad_(False)
        text = copy.deepcopy(parts.text_encoder).to(parts.master_dtype).requires_grad_(False)
        return cls(unet, text)

    def copy(self) -> "Surrogate":
        return Surrogate(copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder))

    def to(self, device: torch.device | str) -> "Surrogate":
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def load_from(self, other: "Surrogate") -> "Surrogate":
        """Overwrite these weights with `other`'s in place (across devices too): ASPL re-copies the
        surrogate every outer loop, and reusing one allocation keeps a full-size UNet from fragmenting
        the allocator."""
        for mine, theirs in ((self.unet, other.unet), (self.text_encoder, other.text_encoder)):
            for dst, src in zip(mine.state_dict().values(), theirs.state_dict().values()):
                dst.copy_(src)
        return self

    def compute_copy(self, dtype: torch.dtype) -> "Surrogate":
        """The same networks in the compute dtype, for PGD passes (no weight gradients there).

        Under autocast, frozen fp32 weights are re-cast on every forward; one cast per phase is cheaper.
        """
        if dtype == next(self.unet.parameters()).dtype:
            return self
        return Surrogate(copy.deepcopy(self.unet).to(dtype), copy.deepcopy(self.text_encoder).to(dtype))


def autocast_for(parts: Any):
    if parts.device.type == "cuda" and parts.dtype != torch.float32:
        return torch.autocast("cuda", dtype=parts.dtype)
    return nullcontext()


def train_surrogate(
    surrogate: Surrogate,
    parts: Any,
    instance_images: torch.Tensor,
    class_images: torch.Tensor | None,
    cfg: SurrogateConfig,
    instance_prompt: str,
    steps: int,
    seed_parts: tuple[Any, ...],
    *,
    trainable: list[torch.nn.Parameter] | None = None,
    learning_rate: float | None = None,
) -> Surrogate:
    """`steps` DreamBooth steps on model-resolution images (N, 3, r, r), in place; returns `surrogate`.

    A fresh AdamW per call, as Anti-DreamBooth's `train_one_epoch` does. Instance images are cycled
    through in order (Anti-DB's step counter restarts each call and only ever sees images 0–2).
    `trainable` restricts training to those parameters (e.g. LoRA adapters); default: the UNet, plus
    the text encoder when `cfg.train_text_encoder`.
    """
    if steps <= 0:
        return surrogate
    unet, text = surrogate.unet, surrogate.text_encoder
    train_text = cfg.train_text_encoder and trainable is None
    params = trainable if trainable is not None else (
        list(unet.parameters()) + (list(text.parameters()) if train_text else []))
    for p in params:
        p.requires_grad_(True)
    unet.train()
    text.train(train_text)
    fused = parts.device.type == "cuda"  # one kernel per step instead of one per tensor
    optimizer = torch.optim.AdamW(params, lr=learning_rate or cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=fused)
    inst = instance_images.detach()
    latent_shape = latent_shape_for(parts, inst.shape[-1])
    use_prior = cfg.prior_preservation and class_images is not None and len(class_images) > 0
    for step in range(steps):
        idx = [(step * cfg.batch_size + j) % len(inst) for j in range(cfg.batch_size)]
        batch = inst[idx]
        if use_prior:
            cidx = [(step * cfg.batch_size + j) % len(class_images) for j in range(cfg.batch_size)]
            batch = torch.cat([batch, class_images[cidx].to(batch)])
        draw = draw_noise(len(batch), latent_shape, *seed_parts, step)
        with autocast_for(parts):
            cond_inst = encode_prompt(parts, instance_prompt, text_encoder=text)
            losses = reconstruction_loss(parts, unet, cond_inst, batch[: cfg.batch_size], draw.rows(0, cfg.batch_size))
            loss = losses.mean()
            if use_prior:
                cond_cls = encode_prompt(parts, cfg.class_prompt, text_encoder=text)
                prior = reconstruction_loss(parts, unet, cond_cls, batch[cfg.batch_size:],
                                            draw.rows(cfg.batch_size, len(batch)))
                loss = loss + cfg.prior_loss_weight * prior.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, error_if_nonfinite=True)
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    unet.eval()
    text.eval()
    return surrogate


def latent_shape_for(parts: Any, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    return (parts.vae.config.latent_channels, resolution // factor, resolution // factor)


# -- class images (prior preservation) --------------------------------------------------------

def class_image_dir(parts: Any, cfg: SurrogateConfig, resolution: int) -> Path:
    key = hashlib.sha256(f"{parts.model_id}|{cfg.class_prompt}|{resolution}|{cfg.class_sample_steps}".encode()).hexdigest()[:12]
    base = Path(cfg.class_images_dir or os.environ.get("CAPRAY_CACHE", Path.home() / ".cache" / "capray"))
    return base / "class-images" / key


def ensure_class_images(parts: Any, cfg: SurrogateConfig, resolution: int) -> torch.Tensor | None:
    """Generate the class images once per (base model, prompt, resolution) and cache them as PNGs.

    Returns (K, 3, r, r) in [-1, 1] on the model's device, or None without prior preservation.
    """
    if not cfg.prior_preservation or cfg.num_class_images == 0:
        return None
    import fcntl

    from PIL import Image

    folder = class_image_dir(parts, cfg, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = sorted(folder.glob("class_*.png"))
        if len(have) < cfg.num_class_images:
            _generate_class_images(parts, cfg, resolution, folder, start=len(have))
        files = sorted(folder.glob("class_*.png"))[: cfg.num_class_images]
    batch = torch.stack([from_uint8(np.asarray(Image.open(f).convert("RGB"))) for f in files])
    return batch.to(parts.device)


@torch.no_grad()
def _generate_class_images(parts: Any, cfg: SurrogateConfig, resolution: int, folder: Path, start: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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
