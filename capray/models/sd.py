"""Load Stable Diffusion 2.1 components through diffusers/transformers `from_pretrained`.

One code path for a hub id (e.g. ``stabilityai/stable-diffusion-2-1-base``), a local SD-format
directory, or the tiny random model (``"tiny"``), so the tests exercise the real loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from capray.config import TINY_MODEL, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.sd == TINY_MODEL:
        from capray.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.tiny_cache_dir))
    return cfg.sd


@dataclass
class DiffusionParts:
    """The SD pieces the attack needs. The UNet/text encoder may be swapped for a surrogate copy."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    model_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def master_dtype(self) -> torch.dtype:
        """Pixels, surrogate weights and the style network: fp32 at least (fp64 for exactness tests)."""
        return torch.promote_types(self.dtype, torch.float32)


def load_diffusion(cfg: ModelConfig, *, path: str | None = None) -> DiffusionParts:
    """Load UNet, VAE, text encoder, tokenizer and DDPM scheduler; freeze them (PGD needs input grads only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = path or resolve_model_path(cfg)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    kw: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except OSError as exc:  # no hub access and no local copy: say so plainly
        raise RuntimeError(
            f"cannot load diffusion model {source!r}: {exc}. Point model.sd at a local SD-format "
            "directory, or use 'tiny' for the built-in tiny random model."
        ) from exc
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing() if hasattr(vae, "enable_gradient_checkpointing") else None
    if device.type == "cuda":  # NHWC convolutions are the fast path for cuDNN on tensor cores
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    return DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, source, device, dtype)


def encode_prompt(parts: DiffusionParts, prompt: str, text_encoder: Any | None = None) -> torch.Tensor:
    """CLIP hidden states for one prompt, shape (1, 77, D)."""
    tok = parts.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(parts.device)
    encoder = text_encoder if text_encoder is not None else parts.text_encoder
    return encoder(ids)[0]
