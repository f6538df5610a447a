"""How much of the protection survives a JPEG re-encode (and other filters), without and with `attack.robust`.

The shared faces (`../shared/data/faces/n000050`, one person) are protected twice with FSMG + CAP
(default; `--method aspl` for ASPL + CAP) on the tiny SD-format model, side by side in one process,
with the same seed: once as written, once with `attack.robust` (the `robust` preset's settings;
`--crop-flip` adds a third run with crop and flip on as well). Each result is then purified by PIL
— JPEG at `--quality` (75) for the RESULT line, and JPEG q50, Gaussian blur σ1 and resize ×0.5 for
the table, `capray evaluate`'s own purifications — and measured on the surrogate FSMG attacks:

    gain(T)  = L(T(protected)) − L(T(clean))      (L: the reconstruction loss, Σ photos, mean over draws)
    retained = gain(JPEG) / gain(identity)         (how much of the adversarial objective survives)

L is taken on held-out draws (timestep, noise, VAE noise) that no PGD step saw. A random model's loss
barely responds to the photo at all, so the tiny model is first fine-tuned on the clean photos
(`--train-steps` 300 at lr 1e-4, FSMG's own DreamBooth step, rebuilt from the same seed for the
measurement): its loss falls from ~4.5 to ~0.7 and an ε-bounded perturbation then moves it
measurably, as it moves SD 2.1's. The photos are resized to the model's resolution (`--size`, 128),
so pixels map 1:1 onto what the model sees, as SD 2.1 at 512 px sees 512 px faces. Also printed:
PSNR, and the cost of a PGD step without and with the robust mode (same process, one after the other).

Last line:
RESULT robustness retained_plain=<x> retained_robust=<y> ratio=<y/x> linf_ok=<1|0>
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from capray import protect_group  # noqa: E402
from capray.attack.engine import GroupAttack, load_models  # noqa: E402
from capray.attack.losses import reconstruction_loss  # noqa: E402
from capray.attack.randomness import draw_noise  # noqa: E402
from capray.attack.surrogate import latent_shape_for  # noqa: E402
from capray.config import load_config  # noqa: E402
from capray.evaluate.transforms import Transform, parse_transform  # noqa: E402
from capray.models.pixels import from_uint8, to_uint8  # noqa: E402
from capray.models.sd import encode_prompt  # noqa: E402

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "n000050"


def load_photos(folder: Path, size: int, limit: int) -> list[torch.Tensor]:
    files = sorted(folder.glob("set_*/*.png"))[:limit]
    if not files:
        sys.exit(f"no photos under {folder}")
    return [from_uint8(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC))) for f in files]


def purifications(quality: int) -> dict[str, Transform]:
    """What the attacker applies to the published uint8 photos (`capray evaluate`'s own purifications); the
    first is the RESULT line's."""
    return {f"jpeg{quality}": parse_transform(f"jpeg:{quality}"), "jpeg50": parse_transform("jpeg:50"),
            "blur1": parse_transform("blur:1"), "resize0.5": parse_transform("resize:0.5")}


class SurrogateLoss:
    """L on the surrogate: Σ over photos of the reconstruction loss, mean over `draws`."""

    def __init__(self, models, net, cfg, draws: list):
        self.parts, self.net, self.draws = models.parts, net, draws
        with torch.no_grad():
            self.cond = encode_prompt(self.parts, cfg.attack.instance_prompt, text_encoder=net.text_encoder)

    @torch.no_grad()
    def __call__(self, rgb: list[np.ndarray]) -> float:
        images = torch.stack([from_uint8(r) for r in rgb]).to(self.parts.device, self.parts.master_dtype)
        return float(np.mean([reconstruction_loss(self.parts, self.net.unet, self.cond, images, d).sum().item()
                              for d in self.draws]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=FACES)
    parser.add_argument("--method", choices=["fsmg", "aspl"], default="fsmg")
    parser.add_argument("--photos", type=int, default=4, help="photos of the identity group")
    parser.add_argument("--size", type=int, default=128, help="photo side = model resolution")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (ASPL: outer loops × 4)")
    parser.add_argument("--train-steps", type=int, default=300, help="FSMG's DreamBooth steps on the clean photos")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality of the RESULT line's re-encode")
    parser.add_argument("--draws", type=int, default=48, help="held-out draws L is averaged over")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-flip", action="store_true", help="also run robust with crop and flip on")
    parser.add_argument("--model", default="tiny", help="model.sd: 'tiny' (default), or SD 2.1 (hub id or directory; "
                        "a GPU run, with ImageNet VGG-19 weights)")
    args = parser.parse_args()

    attack = {"method": args.method, "eps": args.eps, "pgd_steps": args.steps, "fsmg_train_steps": args.train_steps,
              "surrogate": {"learning_rate": 1e-4}, "outer_loops": max(1, args.steps // 4), "adv_steps": 4}
    model = {"resolution": args.size, "sd": args.model}
    if args.model != "tiny":
        model["style_weights"] = "imagenet"
    base = {"seed": args.seed, "model": model, "attack": attack, "cap": {"ratio_max": 10}}
    configs = {"plain": load_config(preset="smoke", overrides=base),
               "robust": load_config(preset="smoke,robust", overrides=base)}
    if args.crop_flip:
        configs["robust+crop+flip"] = load_config(preset="smoke,robust", overrides={
            **base, "attack": {**attack, "robust": {"crop_scale": [0.85, 1.0], "flip": True}}})
    photos = load_photos(args.faces, args.size, args.photos)
    models = load_models(configs["plain"].model)
    identity = "n000050"

    results, step_ms = {}, {}
    for name, cfg in configs.items():
        result = protect_group(photos, cfg, identity=identity, models=models)
        results[name] = result
        step_ms[name] = result.timings["pgd_s"] / len(result.steps) * 1000
        print(f"{name}: {len(result.steps)} PGD steps, {step_ms[name]:.0f} ms per step, "
              f"λ {result.lambda_schedule[-5:]} (last 5)", flush=True)

    surrogate = GroupAttack(models, configs["plain"], identity, photos, None, None).fsmg_surrogate()
    shape = latent_shape_for(models.parts, args.size)
    held_out = [draw_noise(len(photos), shape, "robustness-benchmark", d,
                           num_train_timesteps=models.parts.scheduler.config.num_train_timesteps)
                for d in range(args.draws)]
    loss = SurrogateLoss(models, surrogate, configs["plain"], held_out)
    clean_rgb = [to_uint8(p) for p in photos]
    purify = {"none": lambda rgb: rgb, **purifications(args.quality)}
    clean_loss = {k: loss([t(r) for r in clean_rgb]) for k, t in purify.items()}
    print(f"surrogate: L(clean) = {clean_loss['none']:.4f} on {args.draws} held-out draws")
    print("gain ×1000 per purification (higher: more protection left)")
    print(f"{'':18s}" + "".join(f"{k:>10s}" for k in purify) + f"{'PSNR dB':>10s}{'L∞/255':>8s}")
    retained, linf_ok = {}, True
    for name, result in results.items():
        linf = max(float((x - p).abs().max()) for x, p in zip(result.images, photos))
        linf_ok &= linf <= args.eps + 1e-6
        rgb = [to_uint8(x) for x in result.images]
        gains = {k: loss([t(r) for r in rgb]) - clean_loss[k] for k, t in purify.items()}
        retained[name] = gains[f"jpeg{args.quality}"] / gains["none"] if gains["none"] > 0 else float("nan")
        quality = np.mean([m["psnr"] for m in result.metrics])  # the engine's own record, per photo
        print(f"{name:18s}" + "".join(f"{g * 1000:10.2f}" for g in gains.values())
              + f"{quality:10.2f}{linf * 127.5:8.2f}")
    print(f"cost step_ms_plain={step_ms['plain']:.0f} step_ms_robust={step_ms['robust']:.0f} "
          f"cost_ratio={step_ms['robust'] / step_ms['plain']:.2f}")
    ratio = retained["robust"] / retained["plain"]
    print(f"RESULT robustness retained_plain={retained['plain']:.3f} retained_robust={retained['robust']:.3f} "
          f"ratio={ratio:.2f} linf_ok={int(linf_ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
