"""λ-search cost: Algorithm 1 as written (reference) vs capray's fast exact search, side by side.

Tiny random SD model and random VGG-19 on the CPU, N = 4 photos at 128 px, R = 100, every PGD step a
CAP step (k̂ = 0) so each step runs a full search. Both runs use the same seed, hence the same
randomness at every step; the fast search must choose the same λ at every step, under every
`cap.score_draw` option (`--score-draw`). `--faces DIR` protects real photos (DIR/set_B/*.png when
there is a set_B, else DIR/*.png, resized to the model resolution) instead of random ones.

    python benchmarks/lambda_search.py [--steps 4] [--resolution 128] [--ratio-max 100]
        [--score-draw fresh|gradient|independent] [--faces /work/shared/data/faces/n000050]

Last line: RESULT lambda_search speedup=<reference s / fast s> identical=<same λ at every step>
distinct_mean=<distinct candidates per step> lambda_mean=<mean λ over the CAP steps>
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from capray import load_config, load_models, protect_group


def run(search: str, args: argparse.Namespace, models, images) -> tuple[float, list, list, list]:
    cfg = load_config(preset="smoke", overrides={
        "seed": 7,
        "model": {"resolution": args.resolution, "dtype": args.dtype},
        "attack": {"method": "fsmg", "pgd_steps": args.steps, "fsmg_train_steps": 0,
                   "surrogate": {"prior_preservation": False}},
        "cap": {"ratio_max": args.ratio_max, "start_fraction": 0.0, "search": search,
                "gram_normalization": args.gram, "candidate_batch_size": args.batch,
                "score_draw": args.score_draw, "score_draws": args.score_draws},
    })
    result = protect_group(images, cfg, identity="bench", models=models)
    return result.timings["pgd_s"], result.lambda_schedule, result.distinct_counts, result.images


def load_photos(folder: str, resolution: int, limit: int) -> list[torch.Tensor]:
    from PIL import Image

    root = Path(folder)
    files = sorted((root / "set_B" if (root / "set_B").is_dir() else root).glob("*.png"))[:limit]
    if not files:
        raise SystemExit(f"no .png photos in {folder}")
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC)))
            .permute(2, 0, 1).float() / 127.5 - 1 for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ratio-max", type=int, default=100)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--batch", type=int, default=0, help="cap.candidate_batch_size: candidates per scoring "
                        "call (0: all of a step's)")
    parser.add_argument("--gram", choices=["elements", "none"], default="elements")
    parser.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32",
                        help="fp64 removes rounding near-ties between the two searches")
    parser.add_argument("--score-draw", choices=["fresh", "gradient", "independent"], default="fresh",
                        help="cap.score_draw: the randomness λ candidates are scored on")
    parser.add_argument("--score-draws", type=int, default=1, help="cap.score_draws (K draws averaged)")
    parser.add_argument("--faces", default=None, help="a folder of real photos (e.g. /work/shared/data/faces/n000050)")
    parser.add_argument("--skip-reference", action="store_true",
                        help="only the fast search (for λ schedules; identical= then reads n/a)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = load_config(preset="smoke", overrides={"model": {"resolution": args.resolution, "dtype": args.dtype}})
    models = load_models(cfg.model)
    if args.faces:
        images = load_photos(args.faces, args.resolution, args.photos)
    else:
        gen = torch.Generator().manual_seed(0)
        base = torch.rand(1, 3, args.resolution, args.resolution, generator=gen)
        images = (base + 0.25 * torch.rand(args.photos, 3, args.resolution, args.resolution, generator=gen)
                  ).clamp(0, 1) * 2 - 1

    run("fast", argparse.Namespace(**{**vars(args), "steps": 1}), models, images)  # warm-up
    fast_s, fast_l, distinct, fast_px = run("fast", args, models, images)
    print(f"photos={len(images)} ({args.faces or 'random'}) resolution={args.resolution} R={args.ratio_max} "
          f"steps={args.steps} gram={args.gram} dtype={args.dtype} score_draw={args.score_draw} "
          f"score_draws={args.score_draws}")
    print(f"fast:      {fast_s:.2f} s  λ per step={fast_l}  distinct candidates per step={distinct}")
    if args.skip_reference:
        identical, speedup = "n/a", float("nan")
    else:
        ref_s, ref_l, _, ref_px = run("reference", args, models, images)
        identical = fast_l == ref_l
        speedup = ref_s / fast_s
        same_pixels = all(torch.equal(a, b) for a, b in zip(fast_px, ref_px))
        print(f"reference: {ref_s:.2f} s  λ per step={ref_l}  same pixels={same_pixels} "
              "(fp32 may differ at rounding ties; fp64 is exact)")
    print(f"RESULT lambda_search speedup={speedup:.2f} identical={identical} "
          f"distinct_mean={statistics.mean(distinct):.1f} lambda_mean={statistics.mean(fast_l):.1f}")


if __name__ == "__main__":
    main()
