"""Does protection made at the photo's original resolution survive the attacker's own downsampling?

capray optimises the perturbation in original pixel space, through the same differentiable
resize-shorter-side + center-crop the attacker's DreamBooth data loader applies, and writes the
photo at its original size. Here a group of large photos (4× the model resolution) is protected,
then the diffusion reconstruction loss L_re is measured on
  - the model-resolution view of the published pixels (the engine's own torch resize: what it optimised),
  - the published PNG downsampled the way an attacker does it (PIL bilinear resize + center crop,
    i.e. torchvision's Resize/CenterCrop on PIL images),
each against the clean photos through the same path, under common random draws (fresh ones, and the
draws of the attack's last steps). `retained` = (attacker-path gain) / (model-path gain) on the
attack's draws: 1.0 means nothing was lost to the attacker's resampling. A model-independent check
comes first: the cosine between the perturbation as the engine's resize sees it and as the
attacker's PIL resize sees it. With the tiny random model (CPU) L_re barely responds to any input
change, so the loss figures are a mechanism check only; run with `--set`-style real weights on a GPU
for real numbers (`--model`).

Last line: RESULT resolution_check loss_clean=<..> loss_model_res=<..> loss_downsampled=<..> retained=<..>
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from capray.attack.group import resize_center_crop
from capray.attack.losses import reconstruction_loss
from capray.attack.metrics import from_uint8
from capray.attack.randomness import draw_noise


def photos(side: int) -> list[np.ndarray]:
    from skimage import data

    img = data.astronaut()
    crops = [img[0:400, 56:456], img[20:500, 80:440], img[40:440, 0:500]]
    out = []
    for crop in crops:
        h, w = crop.shape[:2]
        scale = side / min(h, w)
        out.append(np.array(Image.fromarray(crop).resize((round(w * scale), round(h * scale)), Image.LANCZOS)))
    return out


def attacker_view(rgb: np.ndarray, size: int) -> torch.Tensor:
    """torchvision-style Resize(size) (PIL bilinear, antialiased) + CenterCrop(size), then [-1, 1]."""
    img = Image.fromarray(rgb)
    w, h = img.size
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return from_uint8(np.array(img.crop((left, top, left + size, top + size))))


def engine_view(rgb: np.ndarray, size: int) -> torch.Tensor:
    return resize_center_crop(from_uint8(rgb).unsqueeze(0), size)[0]


@torch.no_grad()
def mean_loss(models, cfg, batch: torch.Tensor, draws: int, attack_draws: bool = False) -> float:
    """Mean L_re over `draws` fresh draws, or over the draws of the attack's last `draws` PGD steps."""
    from capray.attack.surrogate import latent_shape_for
    from capray.models.sd import encode_prompt

    parts = models.parts
    cond = encode_prompt(parts, cfg.attack.instance_prompt)
    shape = latent_shape_for(parts, cfg.model.resolution)
    total = 0.0
    steps = cfg.attack.total_pgd_steps
    for k in range(draws):
        seed = (cfg.seed, "resolution-check", "pgd", steps - 1 - k) if attack_draws else ("fresh", k)
        draw = draw_noise(batch.shape[0], shape, *seed,
                          num_train_timesteps=parts.scheduler.config.num_train_timesteps)
        total += float(reconstruction_loss(parts, parts.unet, cond, batch.to(parts.device), draw).mean())
    return total / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=192, help="shorter side of the photos (model sees 64)")
    parser.add_argument("--steps", type=int, default=30, help="PGD steps")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--model", default=None, help="SD model (hub id or directory); default: tiny")
    args = parser.parse_args()
    os.environ.setdefault("CAPRAY_CACHE", os.path.join(tempfile.gettempdir(), "capray-bench-cache"))

    from capray import Protector
    from capray.config import load_config

    # FSMG without surrogate training: PGD straight against the base UNet, the model we measure with
    cfg = load_config(preset="smoke", overrides={"attack": {"method": "fsmg", "fsmg_train_steps": 0,
                                                            "pgd_steps": args.steps},
                                                 **({"model": {"sd": args.model}} if args.model else {})})
    res = cfg.model.resolution
    clean = photos(args.side)
    protector = Protector.from_config(cfg)
    models = protector.models  # the same resident models score the losses below
    result = protector(clean, "resolution-check")  # the identity seeds the draws
    protected, record = result.arrays, result.record
    assert all(p.shape == c.shape for p, c in zip(protected, clean)), "output must keep the original size"
    views = {
        "clean_model": torch.stack([engine_view(c, res) for c in clean]),
        "prot_model": torch.stack([engine_view(p, res) for p in protected]),
        "clean_attacker": torch.stack([attacker_view(c, res) for c in clean]),
        "prot_attacker": torch.stack([attacker_view(p, res) for p in protected]),
    }
    sizes = ", ".join(f"{c.shape[1]}x{c.shape[0]}" for c in clean)
    traj = record.loss_trajectory
    print(f"photos {sizes} → model {res}x{res}; {record.pgd_steps} PGD steps ({record.method}, CAP "
          f"{'on' if record.cap_enabled else 'off'}), L∞ {record.linf_255_max:.0f}/255; L_re on the attack's "
          f"own draws {traj[0]:.5f} → {traj[-1]:.5f}")
    # 1. model-independent: is the perturbation the attacker's resampling sees the one the engine optimised?
    d_model = views["prot_model"] - views["clean_model"]
    d_attacker = views["prot_attacker"] - views["clean_attacker"]
    cosine = float(torch.nn.functional.cosine_similarity(d_model.flatten(), d_attacker.flatten(), dim=0))
    energy = float(d_attacker.norm() / d_model.norm())
    print(f"perturbation at model resolution, attacker's PIL path vs engine's path: cosine {cosine:.3f}, "
          f"norm ratio {energy:.3f}")
    # 2. L_re under the base model, fresh draws and the attack's own last draws
    results = {}
    for label, own in (("fresh draws", False), ("attack's draws", True)):
        loss = {k: mean_loss(models, cfg, v, args.draws if not own else min(args.draws, args.steps), own)
                for k, v in views.items()}
        gain_model = loss["prot_model"] - loss["clean_model"]
        gain_attacker = loss["prot_attacker"] - loss["clean_attacker"]
        print(f"L_re, {label}: clean {loss['clean_attacker']:.5f}; "
              f"model-resolution result {loss['prot_model']:.5f} "
              f"(gain {gain_model:+.5f}); re-downsampled output {loss['prot_attacker']:.5f} "
              f"(gain {gain_attacker:+.5f})")
        results[own] = (loss, gain_attacker / gain_model if gain_model else float("nan"))
    loss, retained = results[True]
    print(f"RESULT resolution_check loss_clean={loss['clean_attacker']:.5f} loss_model_res={loss['prot_model']:.5f} "
          f"loss_downsampled={loss['prot_attacker']:.5f} retained={retained:.3f} perturbation_cosine={cosine:.3f}")


if __name__ == "__main__":
    main()
