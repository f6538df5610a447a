"""DreamBooth surrogate training (FSMG once, ASPL/SimAC every outer loop).

Weights are trained in fp32 by default (`surrogate.master_weights: fp32`), copied from fp32 weights
as stored on disk, never from the bf16 compute copy: Anti-DreamBooth casts the surrogate to bf16 and
steps it at lr 5e-7, which is below bf16's resolution for most weights, so it barely moves
(`master_weights: model` reproduces that). On CUDA the forward runs under autocast in the model dtype.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from capray.attack.guard import check
from capray.attack.losses import reconstruction_loss
from capray.attack.randomness import cpu_generator, draw_noise
from capray.config import SurrogateConfig
from capray.models.sd import encode_prompt


@dataclass
class Surrogate:
    """A trainable (UNet, text encoder) pair, fp32 unless `master_weights: model`."""

    unet: Any
    text_encoder: Any

    @classmethod
    def from_parts(cls, parts: Any, master_weights: str = "fp32") -> Surrogate:
        """A fresh trainable copy: of the weights as loaded from disk (`parts.master`, never upcast
        from the compute dtype), or of the compute weights themselves with `master_weights: model`."""
        if master_weights == "model":
            source, dtype = (parts.unet, parts.text_encoder), parts.dtype
        else:
            source, dtype = parts.master or (parts.unet, parts.text_encoder), parts.master_dtype
        unet, text = (copy.deepcopy(m).to(parts.device, dtype).requires_grad_(False) for m in source)
        if parts.device.type == "cuda":  # as load_diffusion lays out the compute UNet: the host master is not
            unet.to(memory_format=torch.channels_last)
        return cls(unet, text)

    def same_layout(self, other: Surrogate) -> bool:
        """Same parameter names and shapes: `load_from` can copy `other` into these weights."""
        def shapes(s: Surrogate) -> list[tuple[str, tuple[int, ...]]]:
            return [(k, tuple(v.shape)) for m in (s.unet, s.text_encoder) for k, v in m.state_dict().items()]

        return shapes(self) == shapes(other)

    def copy(self) -> Surrogate:
        return Surrogate(copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder))

    def to(self, device: torch.device | str) -> Surrogate:
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def load_from(self, other: Surrogate) -> Surrogate:
        """Overwrite these weights with `other`'s in place (across devices too): ASPL re-copies the
        surrogate every outer loop, and reusing one allocation keeps a full-size UNet from fragmenting
        the allocator."""
        for mine, theirs in ((self.unet, other.unet), (self.text_encoder, other.text_encoder)):
            for dst, src in zip(mine.state_dict().values(), theirs.state_dict().values()):
                dst.copy_(src)
        return self

    def compute_copy(self, dtype: torch.dtype) -> Surrogate:
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
    shuffle: bool = False,
) -> Surrogate:
    """`steps` DreamBooth steps on model-resolution images (N, 3, r, r), in place; returns `surrogate`.

    A fresh AdamW per call, as Anti-DreamBooth's `train_one_epoch` does. Instance images are cycled
    through in order (Anti-DB's step counter restarts each call and only ever sees images 0–2).
    `trainable` restricts training to those parameters (e.g. LoRA adapters); default: the UNet, plus
    the text encoder when `cfg.train_text_encoder`. `shuffle`: batches come from seeded random
    permutations of the dataset, as a shuffled DataLoader gives them (Anti-DreamBooth's FSMG and
    DreamBooth scripts), instead of in order.
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
    n_class = len(class_images) if use_prior else 0
    order = example_order(len(inst), n_class, steps * cfg.batch_size, seed_parts if shuffle else None)
    for step in range(steps):
        example = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
        batch = inst[example % len(inst)]
        if use_prior:
            batch = torch.cat([batch, class_images[example % n_class].to(batch)])
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
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        check(None, parts.dtype, [("the surrogate's training loss", loss), ("the surrogate's weight gradients", norm)])
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    unet.eval()
    text.eval()
    return surrogate


def example_order(n_instance: int, n_class: int, count: int, shuffle_seed: tuple[Any, ...] | None) -> torch.Tensor:
    """The first `count` dataset indices a DreamBooth run visits; example i pairs instance i mod
    n_instance with class image i mod n_class (Anti-DreamBooth's dataset, of length the larger of the
    two). In order without a seed; otherwise epoch after epoch of seeded permutations."""
    length = max(n_instance, n_class)
    if shuffle_seed is None:
        return torch.arange(count) % length
    gen = cpu_generator(*shuffle_seed, "shuffle")
    epochs = -(-count // length)
    return torch.cat([torch.randperm(length, generator=gen) for _ in range(epochs)])[:count]


def latent_shape_for(parts: Any, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    return (parts.vae.config.latent_channels, resolution // factor, resolution // factor)
