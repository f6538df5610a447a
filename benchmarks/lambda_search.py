"""λ-search cost: Algorithm 1 as written (reference) vs capray's fast exact search, side by side.

Tiny random SD model and random VGG-19 on the CPU, N = 4 photos at 128 px, R = 100, every PGD step a
CAP step (k̂ = 0) so each step runs a full search. Both runs use the same seed, hence the same
randomness at every step; the fast search must choose the same λ at every step.

    python benchmarks/lambda_search.py [--steps 4] [--resolution 128] [--ratio-max 100]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from capray import load_config, load_models, protect_group


def run(search: str, args: argparse.Namespace, models, images) -> tuple[float, list, list]:
    cfg = load_config(preset="smoke", overrides={
        "seed": 7,
        "model": {"resolution": args.resolution, "dtype": args.dtype},
        "attack": {"method": "fsmg", "pgd_steps": args.steps, "fsmg_train_steps": 0,
                   "surrogate": {"prior_preservation": False}},
        "cap": {"ratio_max": args.ratio_max, "start_fraction": 0.0, "search": search,
                "gram_normalization": args.gram, "candidate_batch_size": args.batch},
    })
    result = protect_group(images, cfg, identity="bench", models=models)
    return result.timings["pgd_s"], result.lambda_schedule, result.distinct_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ratio-max", type=int, default=100)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="candidates per batched forward")
    parser.add_argument("--gram", choices=["elements", "none"], default="elements")
    parser.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32",
                        help="fp64 removes rounding near-ties between the two searches")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = load_config(preset="smoke", overrides={"model": {"resolution": args.resolution, "dtype": args.dtype}})
    models = load_models(cfg.model)
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, args.resolution, args.resolution, generator=gen)
    images = (base + 0.25 * torch.rand(args.photos, 3, args.resolution, args.resolution, generator=gen)).clamp(0, 1) * 2 - 1

    run("fast", argparse.Namespace(**{**vars(args), "steps": 1}), models, images)  # warm-up
    fast_s, fast_l, distinct = run("fast", args, models, images)
    ref_s, ref_l, _ = run("reference", args, models, images)

    identical = fast_l == ref_l
    speedup = ref_s / fast_s
    print(f"photos={args.photos} resolution={args.resolution} R={args.ratio_max} steps={args.steps} "
          f"gram={args.gram} dtype={args.dtype}")
    print(f"reference: {ref_s:.2f} s  λ={ref_l}")
    print(f"fast:      {fast_s:.2f} s  λ={fast_l}  distinct candidates per step={distinct}")
    print(f"RESULT lambda_search speedup={speedup:.2f} identical={identical} "
          f"distinct_mean={statistics.mean(distinct):.1f}")


if __name__ == "__main__":
    main()
