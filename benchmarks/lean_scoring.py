"""One CAP step's λ scoring before and after issue 20's leaner scoring, side by side in one process.

Why: the λ search dominates the cost, and how it is cut into calls and how photos reach the model
decide its memory. "Before" is the engine as it was: `cap.candidate_batch_size: 8` (a step's R + 1 =
101 candidates in ~13 evaluator calls, each re-shipping the four vectors when sharded), same-size
photos of a scoring chunk stacked at original resolution before resizing (32 photos of 12 MP: 4.6 GB,
twice), and resize operators rebuilt and copied host→device on every call. "After" is today's
default: one call per step, photo-by-photo resizing, cached operators. The script checks that both
choose the same λ and the same pixels, and prints evaluator calls and the search's peak memory.

Peak memory: the CUDA allocator's peak above what was live before the search; on the CPU, the peak of
live tensor bytes created inside the search, counted by a torch dispatch mode (the process's RSS
only grows, so it cannot tell two measurements in one process apart).

On a GPU, it also measures what a PGD phase's compute copy costs: a fresh deep copy per phase (before)
against the actor's one copy refreshed in place (after).

Standalone: ``python benchmarks/lean_scoring.py --tiny`` (CPU, tiny model) prints
``RESULT lean_scoring calls_before=<a> calls_after=<b> peak_mb_before=<c> peak_mb_after=<d> same=<bool>``.
`benchmarks/gpu_step.py` runs the same measurement and prints the same figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import weakref
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside (each storage once, freed when its last tensor dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if not size:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [size, 1]
            self.now += size
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key in inputs and key not in self.live:  # a view of a tensor from before: no new memory
                    continue
                self._track(t)
        return out


@contextmanager
def peak_bytes(device: torch.device):
    """Yields a dict whose "bytes" is the peak memory of the block (see the module docstring)."""
    out = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize()
        out["bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        mode = LiveTensorBytes()
        with mode:
            yield out
        out["bytes"] = mode.peak


@contextmanager
def engine_before_issue_20():
    """The scoring path as it was: same-size chunks stacked at original resolution, operators rebuilt."""
    from capray.attack import group
    from capray.attack.group import GroupLayout, resize_center_crop

    lean_rows, cached = GroupLayout.model_rows, group._crop_operators

    def stacked_rows(self, candidates, start, stop, resolution, augments=None):
        if isinstance(candidates, torch.Tensor) or not self.uniform or augments is not None:
            return lean_rows(self, candidates, start, stop, resolution, augments)
        offsets = self.offsets()

        def photo(q: int) -> torch.Tensor:
            m, i = divmod(q, self.n)
            return candidates.values(m, offsets[i], offsets[i + 1]).view(self.shapes[i])

        return resize_center_crop(torch.stack([photo(q) for q in range(start, stop)]), resolution)

    GroupLayout.model_rows = stacked_rows
    group._crop_operators = cached.__wrapped__
    try:
        yield
    finally:
        GroupLayout.model_rows, group._crop_operators = lean_rows, cached


class CountingEvaluator:
    def __init__(self, inner: Any):
        self.inner, self.calls = inner, 0

    def __call__(self, candidates, draw):
        self.calls += 1
        return self.inner(candidates, draw)


def measure(models: Any, cfg: Any, n: int, height: int, width: int, ratio_max: int = 100) -> dict[str, Any]:
    """One CAP step's λ search on N photos of height × width, before and after (see the module docstring)."""
    from capray.attack.engine import GroupAttack
    from capray.attack.surrogate import Surrogate

    cfg = cfg.model_copy(update={"cap": cfg.cap.model_copy(update={"ratio_max": ratio_max, "start_fraction": 0.0})})
    gen = torch.Generator().manual_seed(11)
    low = torch.rand(n, 3, max(height // 32, 2), max(width // 32, 2), generator=gen) * 1.6 - 0.8
    photos = list(torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear"))
    attack = GroupAttack(models, cfg, "lean", photos, None, None)
    net = Surrogate.from_parts(models.parts)
    phase = attack.start_phase(net)
    draw = attack.draw_for_step(0)
    grads = attack.gradients(phase, attack.x, draw, consistency=True)
    out: dict[str, Any] = {"n": n, "photo": f"{height}x{width}", "ratio_max": ratio_max,
                           "score_image_batch_size": cfg.cap.score_image_batch_size}
    results = {}
    for label, batch in (("before", 8), ("after", cfg.cap.candidate_batch_size)):
        attack.cfg = cfg.model_copy(update={"cap": cfg.cap.model_copy(update={"candidate_batch_size": batch})})
        counting = CountingEvaluator(phase.evaluator)
        counted = dataclasses.replace(phase, evaluator=counting)
        with engine_before_issue_20() if label == "before" else _nothing(), peak_bytes(models.device) as peak:
            results[label] = attack.search_ratio(counted, 0, draw, grads)
        out[label] = {"calls": counting.calls, "peak_mb": peak["bytes"] / 1e6, "ratio": results[label].ratio,
                      "distinct": results[label].distinct}
    out["same"] = (results["before"].ratio == results["after"].ratio
                   and torch.equal(results["before"].next_x, results["after"].next_x))
    phase.release()
    if models.device.type == "cuda":
        out["compute_copy"] = compute_copy_cost(models, net)
    return out


@contextmanager
def _nothing():
    yield


def compute_copy_cost(models: Any, net: Any) -> dict[str, float]:
    """GB a PGD phase's compute copy allocates: a fresh deep copy (before) vs the borrowed copy refreshed in
    place (after; its first allocation happened in an earlier phase)."""
    with peak_bytes(models.device) as fresh:
        copy = net.compute_copy(models.parts.dtype)
        del copy
    _, release = models.borrow_compute_copy(net)  # the actor's copy exists from now on
    release()
    with peak_bytes(models.device) as reused:
        _, release = models.borrow_compute_copy(net)
        release()
    return {"before_gb": fresh["bytes"] / 1e9, "after_gb": reused["bytes"] / 1e9}


def describe(out: dict[str, Any]) -> list[str]:
    b, a = out["before"], out["after"]
    lines = [f"λ scoring of one CAP step (N = {out['n']} photos of {out['photo']}, R = {out['ratio_max']}, "
             f"{b['distinct']} distinct candidates, chunks of {out['score_image_batch_size']} images):",
             f"  before issue 20: {b['calls']} evaluator calls, peak {b['peak_mb']:.1f} MB",
             f"  after:           {a['calls']} evaluator calls, peak {a['peak_mb']:.1f} MB "
             f"(×{b['peak_mb'] / max(a['peak_mb'], 1e-9):.1f} less); same λ and pixels: {out['same']}"]
    copy = out.get("compute_copy")
    if copy:
        lines.append(f"  compute copy per PGD phase: {copy['before_gb']:.2f} GB allocated before, "
                     f"{copy['after_gb']:.2f} GB after (one copy per actor, refreshed in place)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny random model")
    p.add_argument("--sd", default=None, help="an SD-format directory (default: tiny with --tiny)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--height", type=int, default=None, help="default 480 (--tiny) or 3000")
    p.add_argument("--width", type=int, default=None, help="default 640 (--tiny) or 4000")
    args = p.parse_args(argv)
    from capray.attack.engine import load_models
    from capray.config import load_config

    if args.tiny:
        torch.set_num_threads(1)
        cfg = load_config(preset="smoke", overrides={"model": {"device": "cpu"}})
    elif args.sd:
        cfg = load_config(preset="paper", overrides={"model": {"sd": args.sd, "style_weights": "random"}})
    else:
        print("give --tiny, or --sd DIR on a GPU", file=sys.stderr)
        return 2
    models = load_models(cfg.model)
    out = measure(models, cfg, args.n, args.height or (480 if args.tiny else 3000),
                  args.width or (640 if args.tiny else 4000))
    print("\n".join(describe(out)))
    print(f"RESULT lean_scoring calls_before={out['before']['calls']} calls_after={out['after']['calls']} "
          f"peak_mb_before={out['before']['peak_mb']:.1f} peak_mb_after={out['after']['peak_mb']:.1f} "
          f"same={out['same']}")
    return 0 if out["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
