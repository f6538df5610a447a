"""Time the engine's hot path on one GPU and project the cost of protecting one identity.

Why: GPU time is scarce, so one short run must answer "how fast is a PGD step, how fast is the λ
search, how much memory does ASPL + CAP need, and how far from the hardware's peak are we". The
script builds the full-size Stable Diffusion 2.1-base architectures (random weights: timing does not
depend on their values), saves them as an SD-format directory and loads them through the product's
own loader (`capray.models.sd.load_diffusion` via `load_models`), then measures, after warm-up and
with CUDA events:

* one PGD step of the engine (`GroupAttack.pgd_step`) for N photos: VAE encode + UNet forward and
  backward w.r.t. the images, on the fp32-master surrogate under bf16 autocast (what ASPL runs),
  with and without gradient checkpointing, and on the bf16 base weights (autocast weight-cast cost);
* the extra work of a CAP step (consistency loss forward + backward through VGG-19);
* one full CAP step (the real fast λ search, however many distinct candidates it finds);
* λ-candidate evaluation throughput (no-grad reconstruction loss) at several candidate batch sizes;
* one ASPL surrogate training step (fp32 master weights, AdamW, prior preservation) and the
  per-outer-loop surrogate copy;
* a large matmul in the compute dtype as the attainable peak, FLOPs per pass with
  `torch.utils.flop_counter`, achieved TFLOP/s and the fraction of peak;
* one real, shortened `protect_group` call (ASPL + CAP, gradient checkpointing) and its peak memory,
  to check the "ASPL + CAP within 24 GB with checkpointing" target;
* the peak memory of one CAP step for N = 4, 16 and 64 photos (`--memory-ns`): gradients accumulate
  over `attack.image_batch_size` photos and scoring runs `cap.score_image_batch_size` images per
  forward, so it should stay flat as N grows;
* λ-candidate sharding's per-phase cost: bytes of the attacked UNet's state and the device→host /
  host→device copies a scoring actor's phase state takes (`capray.distributed.candidates.PhaseState`);
* `model.deterministic`: a PGD step with and without it (its cost) and two identical short runs in
  that mode, which must give identical pixels (the process's settings are restored afterwards);
* λ scoring of one CAP step before and after issue 20's leaner scoring (`benchmarks/lean_scoring.py`:
  evaluator calls and peak memory, 4 photos of 12 MP; 480×640 with --tiny), and the per-phase
  compute copy's allocation before and after;
* λ diagnostics: distinct candidates per searched step out of R + 1, and whether λ stopped choosing
  (`--style-weights imagenet` and `--sd` for the real models' answer).

The identity projection composes the measured pieces for the paper's recipe (ASPL: 50 outer loops ×
6 PGD steps, CAP on the last half, 3 + 3 surrogate steps per loop) with an assumed number of distinct
candidates per CAP step (`--candidates`, default R + 1 = 101, the worst case).

`--tiny` runs the same code on the CPU with the tiny random model so CI can smoke-test it (its
numbers mean nothing). On the CPU, `peak_gb` is the process's max RSS and attention FLOPs are not
counted (torch has no FLOP formula for the CPU SDPA kernel).

Last line: ``RESULT gpu_step device=<name> mfu=<f> step_ms=<m> candidates_per_s=<c> identity_s=<s>
peak_gb=<g>`` where `step_ms` is the plain PGD step, `candidates_per_s` is candidate *images* per
second at the best batch size, `mfu` is projected identity FLOPs / (identity_s × matmul peak), and
`peak_gb` is the peak of the `protect_group` check (or of the timed pieces with `--skip-protect`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# -- the full-size SD 2.1-base architecture (stabilityai/stable-diffusion-2-1-base configs) -----------

SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, center_input_sample=False,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)
SD21_TEXT = dict(  # OpenCLIP ViT-H text tower as SD 2.x uses it (penultimate layer → 23 layers)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5,
)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


def build_sd21_networks(device: Any = "meta", vocab_size: int | None = None,
                        special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """UNet, VAE and text encoder with SD 2.1-base's architecture, randomly initialised on `device`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = dict(SD21_TEXT, **(special_ids or {}))
    if vocab_size:
        text_cfg["vocab_size"] = max(vocab_size, SD21_TEXT["vocab_size"])
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**SD21_UNET),
            "vae": AutoencoderKL(**SD21_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg)),
        }


def write_sd21_dir(root: Path, device: Any, dtype: Any) -> Path:
    """Save random full-size SD 2.1-base parts in SD layout so `load_diffusion` loads them like the real thing."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from capray.models.tiny import write_model_index, write_tokenizer

    write_tokenizer(root / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    nets = build_sd21_networks(device, len(tok), {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                                  "pad_token_id": tok.pad_token_id})
    for name, net in nets.items():
        net.to(dtype).save_pretrained(root / name)
    del nets
    DDPMScheduler(**SD21_SCHEDULER).save_pretrained(root / "scheduler")
    write_model_index(root)
    return root


# -- measuring ------------------------------------------------------------------------------------------

class Clock:
    """Median milliseconds of `fn` after warm-up: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: Any, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def ms(self, fn: Callable[[], Any], iters: int | None = None, warmup: int | None = None) -> float:
        import torch

        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.iters if iters is None else iters):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class PeakMemory:
    """Peak memory (GB) of what runs inside: CUDA allocator peak, or process max RSS on the CPU."""

    def __init__(self, device: Any):
        self.device, self.gb = device, 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gb = self.peak_now()

    def peak_now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


@contextmanager
def attempt(out: dict[str, Any], name: str) -> Iterator[None]:
    """Run one measurement; on failure record why and go on (one bad piece must not cost a scarce GPU run)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 — reported in the output and the exit code
        out["errors"][name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            pass


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: Any, dtype: Any, n: int, clock: Clock) -> float:
    """Attainable dense throughput: an n×n×n matmul in the compute dtype."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = clock.ms(lambda: a @ b, iters=max(clock.iters, 10))
    return 2 * n**3 / (ms / 1e3) / 1e12


# -- the projection -------------------------------------------------------------------------------------

def paper_plan(cfg: Any, candidates: int) -> dict[str, int]:
    """How many of each piece one identity needs under `cfg`'s recipe (ASPL/SimAC: per outer loop
    one surrogate copy, `surrogate_steps` training steps on clean and on perturbed photos)."""
    a = cfg.attack
    total = a.total_pgd_steps
    cap_steps = total - int(round(cfg.cap.start_fraction * total)) if cfg.cap.enabled else 0
    loops = 1 if a.method == "fsmg" else a.outer_loops
    train = a.fsmg_train_steps if a.method == "fsmg" else 2 * a.outer_loops * a.surrogate_steps
    return {"pgd_steps": total, "cap_steps": cap_steps, "surrogate_steps": train, "surrogate_copies": loops,
            "candidates_per_cap_step": candidates}


def project_identity(pieces: dict[str, float], plan: dict[str, int]) -> float:
    """Seconds for one identity: every PGD step, plus consistency + candidate scoring on CAP steps,
    plus surrogate training and copies. `candidate_ms` is per group candidate (N images)."""
    ms = (plan["pgd_steps"] * pieces["pgd_step_ms"]
          + plan["cap_steps"] * (pieces["cap_extra_ms"] + plan["candidates_per_cap_step"] * pieces["candidate_ms"])
          + plan["surrogate_steps"] * pieces["surrogate_step_ms"]
          + plan["surrogate_copies"] * pieces["surrogate_copy_ms"])
    return ms / 1e3


def project_flops(flops: dict[str, float], plan: dict[str, int]) -> float:
    return (plan["pgd_steps"] * flops["pgd_step"]
            + plan["cap_steps"] * (flops["cap_extra"] + plan["candidates_per_cap_step"] * flops["candidate"])
            + plan["surrogate_steps"] * flops["surrogate_step"])


# -- the run --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny random model (CI)")
    p.add_argument("--n", type=int, default=4, help="photos per identity group")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    p.add_argument("--batch-sizes", default=None, help="candidate batch sizes (candidates, each N images); "
                   "default 1,2,4,8,16 (1,2 with --tiny)")
    p.add_argument("--candidates", type=int, default=None,
                   help="distinct candidates per CAP step for the projection (default R+1 = 101; 11 with --tiny)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 8192; 256 with --tiny)")
    p.add_argument("--compile", action="store_true", help="also time candidate scoring with torch.compile(UNet) "
                   "(adds the compile time to the run)")
    p.add_argument("--memory-ns", default=None, help="group sizes N for the peak-memory-by-N check "
                   "(default 4,16,64; 4,16 with --tiny)")
    p.add_argument("--skip-protect", action="store_true", help="skip the end-to-end protect_group memory check")
    p.add_argument("--workdir", default=None, help="where the random SD 2.1 directory is written (temp by default)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--style-weights", default="random", help="model.style_weights of the full-size run: 'random', "
                   "'imagenet' (torchvision cache) or a VGG-19 state-dict path; the λ diagnostics mean most with "
                   "the real ones")
    p.add_argument("--sd", default=None, help="a real SD-format directory instead of random SD 2.1 weights")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.resolution = args.resolution or (64 if tiny else 512)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if tiny else "1,2,4,8,16")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else 1 if tiny else 2
    args.iters = args.iters if args.iters is not None else 1 if tiny else 5
    args.matmul_n = args.matmul_n or (256 if tiny else 8192)
    args.memory_ns = [int(n) for n in (args.memory_ns or ("4,16" if tiny else "4,16,64")).split(",")]
    return args


def make_config(args: argparse.Namespace, sd: str, model: dict[str, Any] | None = None,
                attack: dict[str, Any] | None = None) -> Any:
    """The paper preset on random SD 2.1 weights (smoke preset and the tiny model with --tiny)."""
    from capray.config import load_config

    if args.tiny:
        preset, base = "smoke", {"device": "cpu"}
    else:
        preset, base = "paper", {"sd": sd, "device": "cuda", "dtype": "bf16", "style_weights": args.style_weights}
    overrides = {"model": {**base, "resolution": args.resolution, **(model or {})}, "attack": attack or {}}
    return load_config(preset=preset, overrides=overrides)


def test_images(n: int, size: int, seed: int) -> list[Any]:
    """Smooth random photos in [-1, 1] (content does not change the cost)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(size // 16, 2), max(size // 16, 2), generator=gen) * 1.6 - 0.8
    return list(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


def set_checkpointing(parts_or_unet: Any, on: bool) -> None:
    for module in parts_or_unet:
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing() if on else module.disable_gradient_checkpointing()


def hot_path_options(args: argparse.Namespace, clock: Clock, parts: Any, net: Any, loss_on: Callable[..., Any],
                     x: Any, batch: int, draw: Any, cfg: Any, layout: Any) -> dict[str, float]:
    """Candidate scoring at `batch` under engine options that are not (yet) the default, to decide them."""
    import torch

    from capray.attack import cap as cap_search

    gen = torch.Generator().manual_seed(4)
    cands = (x + cfg.attack.alpha * (torch.randint(0, 3, (batch, x.numel()), generator=gen) - 1).to(x)).clamp(-1, 1)

    def score_ms(loss: Callable[..., Any]) -> float:
        scorer = cap_search.InProcessEvaluator(loss, layout, args.resolution, batch * args.n)
        return clock.ms(lambda: scorer(cands, draw)) / batch

    out = {"fp32-master UNet under autocast (engine now)": score_ms(loss_on(net.unet)),
           f"{cfg.model.dtype} UNet weights (no per-forward cast)": score_ms(loss_on(parts.unet))}
    parts.vae.to(memory_format=torch.channels_last)
    try:
        out["+ VAE channels_last"] = score_ms(loss_on(net.unet))
    finally:
        parts.vae.to(memory_format=torch.contiguous_format)
    if args.compile:
        compiled = torch.compile(net.unet, dynamic=False)
        t0 = time.perf_counter()
        scorer = cap_search.InProcessEvaluator(loss_on(compiled), layout, args.resolution, batch * args.n)
        scorer(cands, draw)
        out["torch.compile first call (compile time)"] = (time.perf_counter() - t0) * 1e3  # whole call, ms
        out["+ torch.compile UNet"] = score_ms(loss_on(compiled))
    return out


def measure(args: argparse.Namespace, models: Any, cfg: Any, clock: Clock) -> dict[str, Any]:
    """Every timed piece, its FLOPs and its peak memory."""
    import torch

    from capray.attack import cap as cap_search
    from capray.attack.engine import GroupAttack, Phase
    from capray.attack.losses import consistency_part, reconstruction_loss
    from capray.attack.surrogate import Surrogate, autocast_for, train_surrogate
    from capray.models.sd import encode_prompt

    parts, device, n, res = models.parts, models.device, args.n, args.resolution
    out: dict[str, Any] = {"ms": {}, "flops": {}, "peak_gb": {}, "errors": {}}
    images = test_images(n, res, seed=1)
    attack = GroupAttack(models, cfg, "bench", images, None, None)
    net = Surrogate.from_parts(parts)  # ASPL attacks the fp32-master surrogate under autocast
    with torch.no_grad():
        cond = encode_prompt(parts, cfg.attack.instance_prompt, text_encoder=net.text_encoder)

    def loss_on(unet: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def image_loss(images: torch.Tensor, draw: Any) -> torch.Tensor:  # as GroupAttack.start_phase builds it
            with autocast_for(parts):
                return reconstruction_loss(parts, unet, cond, images, draw)

        return image_loss

    candidate_loss = loss_on(net.unet)

    plain_k, cap_k = 0, max(attack.k_hat, 0)
    plain_draw = attack.draw_for_step(plain_k)
    context = cap_search.EvaluationContext(net.unet, cond, attack.layout, res)
    evaluator = cap_search.make_evaluator(candidate_loss, context, cfg.cap.score_image_batch_size)

    records: list[Any] = []

    def pgd_step(on: Any = net, k: int = plain_k) -> None:
        attack.steps = [None] * k  # the engine numbers the step by the records before it
        attack.pgd_step(Phase(on, cond, evaluator))
        records.append(attack.steps.pop())  # keep the attack's history clean between timings

    # plain PGD step (the engine's own step function; parameters frozen, grad w.r.t. the images only)
    with attempt(out, "pgd_step"), PeakMemory(device) as mem:
        out["ms"]["pgd_step"] = clock.ms(pgd_step)
    out["peak_gb"]["pgd_step"] = mem.gb
    with attempt(out, "pgd_step flops"):
        out["flops"]["pgd_step"] = count_flops(pgd_step)
    with attempt(out, "pgd_step_checkpointed"), PeakMemory(device) as mem:
        set_checkpointing([net.unet, parts.vae], True)
        try:
            out["ms"]["pgd_step_checkpointed"] = clock.ms(pgd_step)
        finally:
            set_checkpointing([net.unet, parts.vae], False)
    out["peak_gb"]["pgd_step_checkpointed"] = mem.gb
    with attempt(out, "pgd_step_base_weights"):
        base = Surrogate(parts.unet, parts.text_encoder)  # compute-dtype weights: no per-forward weight cast
        out["ms"]["pgd_step_base_weights"] = clock.ms(lambda: pgd_step(base))

    # the CAP extra: consistency loss and its gradient through the style network
    def cap_extra() -> None:
        xr = attack.x.detach().requires_grad_(True)
        stats = attack.style_stats(attack.layout.to_model(xr, res))
        torch.autograd.grad(consistency_part(stats, attack.mean_style(attack.x), n), xr)

    with attempt(out, "cap_extra"):
        out["ms"]["cap_extra"] = clock.ms(cap_extra)
        out["flops"]["cap_extra"] = count_flops(cap_extra)

    # one full CAP step: the real fast λ search with as many distinct candidates as it finds
    if attack.cap_on:
        with attempt(out, "cap_step"), PeakMemory(device) as mem:
            out["ms"]["cap_step"] = clock.ms(lambda: pgd_step(k=cap_k), iters=1, warmup=1)
            out["cap_step_distinct"] = records[-1].distinct
        out["peak_gb"]["cap_step"] = mem.gb

    # λ-candidate scoring throughput at several batch sizes (no grad, batched on the batch dimension)
    gen = torch.Generator().manual_seed(2)
    x = attack.x.detach()
    out["candidates"] = {}
    for bs in args.batch_sizes:
        with attempt(out, f"candidates batch {bs}"), PeakMemory(device) as mem:
            signs = (torch.randint(0, 3, (bs, x.numel()), generator=gen) - 1).to(device, x.dtype)
            cands = (x + cfg.attack.alpha * signs).clamp(-1, 1)
            del signs
            scorer = cap_search.InProcessEvaluator(candidate_loss, attack.layout, res, bs * n)
            ms = clock.ms(functools.partial(scorer, cands, plain_draw))
            out["candidates"][bs] = {"ms": ms, "images_per_s": bs * n / (ms / 1e3), "peak_gb": mem.peak_now()}
        cands = None
    if out["candidates"]:
        best = max(out["candidates"], key=lambda b: out["candidates"][b]["images_per_s"])
        out["best_batch"] = best
        out["ms"]["candidate"] = out["candidates"][best]["ms"] / best  # per group candidate (N images)
        with attempt(out, "hot-path options"):
            out["options_ms"] = hot_path_options(args, clock, parts, net, loss_on, x, best, plain_draw, cfg,
                                                attack.layout)
    with attempt(out, "candidate flops"):
        one = cap_search.InProcessEvaluator(candidate_loss, attack.layout, res, n)
        out["flops"]["candidate"] = count_flops(lambda: one(x.unsqueeze(0), plain_draw))

    # ASPL surrogate: one training step (fp32 master weights, AdamW, prior preservation) and one copy
    s = cfg.attack.surrogate
    inst = attack.model_view()
    klass = torch.rand(2, 3, res, res, generator=gen).to(device) * 2 - 1 if s.prior_preservation else None
    steps = max(cfg.attack.surrogate_steps, 1)

    def train() -> None:  # one engine call = a fresh AdamW + `surrogate_steps` steps, as in each ASPL phase
        train_surrogate(net, parts, inst, klass, s, cfg.attack.instance_prompt, steps, ("bench",))

    with attempt(out, "surrogate_step"), PeakMemory(device) as mem:
        out["ms"]["surrogate_step"] = clock.ms(train, iters=max(1, clock.iters // 2)) / steps
    out["peak_gb"]["surrogate_train"] = mem.gb
    with attempt(out, "surrogate_step flops"):
        out["flops"]["surrogate_step"] = count_flops(lambda: train_surrogate(
            net, parts, inst, klass, s, cfg.attack.instance_prompt, 1, ("bench",)))
    with attempt(out, "surrogate_copy"):
        out["ms"]["surrogate_copy"] = clock.ms(lambda: net.copy(), iters=max(1, clock.iters // 2), warmup=0)
    with attempt(out, "phase transfer"):
        out["phase_transfer"] = phase_transfer(parts, net, cond, attack.layout, res)
    with attempt(out, "memory by group size"):
        out["memory_by_n"] = memory_by_group_size(args, models, cfg, net)
    with attempt(out, "deterministic mode"):
        out["deterministic"] = determinism_check(args, models, cfg, clock, net)
    # Free the surrogate and the attack's tensors for the next measurement; rebound rather than deleted,
    # because the closures above still name them (none of them runs again).
    net = attack = None
    gc.collect()
    return out


def phase_transfer(parts: Any, net: Any, cond: Any, layout: Any, res: int) -> dict[str, float]:
    """What λ-candidate sharding ships per PGD phase (`capray.distributed.candidates.PhaseState`): the
    attacked UNet's weights in the compute dtype, copied device→host once by the runner and host→device
    once by each scoring actor (the object store in between: shared memory on one node, the network across)."""
    import copy

    import torch

    from capray.attack.cap import EvaluationContext
    from capray.distributed.candidates import PhaseState

    def sync() -> None:
        if parts.device.type == "cuda":
            torch.cuda.synchronize(parts.device)

    attacked = net.compute_copy(parts.dtype) if parts.device.type == "cuda" else net  # as start_phase does
    sync()
    t0 = time.perf_counter()
    state = PhaseState.of(EvaluationContext(attacked.unet, cond, layout, res))
    sync()
    d2h = time.perf_counter() - t0
    peer_unet = copy.deepcopy(attacked.unet)
    sync()
    t0 = time.perf_counter()
    peer_unet.load_state_dict(state.unet_state)
    sync()
    h2d = time.perf_counter() - t0
    del peer_unet, attacked
    return {"gb": state.nbytes / 1e9, "d2h_ms": d2h * 1e3, "h2d_ms": h2d * 1e3}


def memory_by_group_size(args: argparse.Namespace, models: Any, cfg: Any, net: Any) -> dict[int, dict[str, float]]:
    """Peak memory of one CAP step (micro-batched gradients of both losses, then scoring two candidates)
    for N = --memory-ns photos: with micro-batching it should stay flat as N grows."""
    import torch

    from capray.attack.engine import GroupAttack
    from capray.attack.pgd import sign_step

    out = {}
    for n in args.memory_ns:
        with PeakMemory(models.device) as mem:
            t0 = time.perf_counter()
            attack = GroupAttack(models, cfg, "memory", test_images(n, args.resolution, seed=5), None, None)
            phase = attack.start_phase(net)
            draw = attack.draw_for_step(0)
            grads = attack.gradients(phase, attack.x, draw, consistency=True)
            a = cfg.attack
            cands = torch.stack([sign_step(attack.x, attack.x0, grads.attack - r * grads.consistency, a.alpha, a.eps)
                                 for r in (0, 1)])
            phase.evaluator(cands, draw)
            seconds = time.perf_counter() - t0
        out[n] = {"peak_gb": mem.gb, "seconds": seconds}
        del attack, phase, grads, cands
        gc.collect()
    return out


def determinism_check(args: argparse.Namespace, models: Any, cfg: Any, clock: Clock, net: Any) -> dict[str, Any]:
    """What `model.deterministic` costs (one PGD step with and without it) and whether two identical
    short runs then give identical pixels. Restores the process's settings afterwards."""
    import os

    import torch

    from capray import protect_group
    from capray.attack.engine import GroupAttack
    from capray.models.sd import enable_deterministic_mode

    images = test_images(args.n, args.resolution, seed=6)

    def step() -> None:
        attack = GroupAttack(models, cfg, "det", images, None, None)
        attack.pgd_step(attack.start_phase(net))

    short = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={
        "method": "fsmg", "pgd_steps": 2, "fsmg_train_steps": 0}), "cap": cfg.cap.model_copy(update={
            "ratio_max": 10, "start_fraction": 0.0})})
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    free_ms = clock.ms(step)
    try:
        enable_deterministic_mode()
        deterministic_ms = clock.ms(step)
        runs = [protect_group(images, short, identity="det", models=models) for _ in range(2)]
        identical = all(torch.equal(a, b) for a, b in zip(runs[0].images, runs[1].images))
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    return {"pgd_step_ms": free_ms, "pgd_step_deterministic_ms": deterministic_ms,
            "slowdown": deterministic_ms / free_ms, "identical_pixels": identical,
            "cublas_workspace_set_before_cuda": saved[3] is not None}


def protect_check(args: argparse.Namespace, models: Any, sd: str, workdir: Path) -> dict[str, Any]:
    """One real, shortened ASPL + CAP run in the 24 GB profile (checkpointing, main surrogate offloaded)."""
    from capray import protect_group

    cfg = make_config(args, sd, model={"gradient_checkpointing": True}, attack={
        "outer_loops": 2, "adv_steps": 2, "surrogate_steps": 1,
        "surrogate": {"num_class_images": 2, "class_sample_steps": 2, "class_images_dir": str(workdir / "class"),
                      "offload_main": True}})
    set_checkpointing([models.parts.unet, models.parts.vae], True)  # what load_diffusion does for this flag
    images = test_images(args.n, args.resolution, seed=3)
    try:
        with PeakMemory(models.device) as mem:
            t0 = time.perf_counter()
            result = protect_group(images, cfg, identity="bench", models=models)
            seconds = time.perf_counter() - t0
    finally:
        set_checkpointing([models.parts.unet, models.parts.vae], models.config.gradient_checkpointing)
    budget = round(cfg.attack.eps * 127.5)
    linf = max(m["linf_255"] for m in result.metrics)
    return {"peak_gb": mem.gb, "seconds": seconds, "pgd_steps": len(result.steps),
            "lambda_schedule": result.lambda_schedule, "distinct": result.distinct_counts,
            "linf_255": linf, "linf_budget_255": budget, "within_budget": linf <= budget,
            "timings": result.timings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from capray.attack.engine import load_models
    from capray.models.sd import DTYPES

    if args.tiny:  # a shared CI core: one thread avoids oversubscription stalls that swamp the timings
        torch.set_num_threads(1)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: the full-size benchmark needs a GPU (use --tiny for the CPU smoke run)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="capray-gpu-step-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        if args.tiny:
            sd = "tiny"
        elif args.sd:
            sd = args.sd
        else:
            sd = str(write_sd21_dir(workdir / "sd21-base-random", "cuda", torch.bfloat16))
            torch.cuda.empty_cache()
        cfg = make_config(args, sd)
        models = load_models(cfg.model)
        device = models.device
        setup_s = time.perf_counter() - t0
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        clock = Clock(device, args.warmup, args.iters)
        dtype = DTYPES[cfg.model.dtype]
        peak_tflops = matmul_peak_tflops(device, dtype, args.matmul_n, clock)
        figures = measure(args, models, cfg, clock)
        figures["static_gb"] = aspl_static_memory_gb(models, cfg)
        with attempt(figures, "lean scoring"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import lean_scoring

            height, width = (480, 640) if args.tiny else (3000, 4000)
            figures["lean_scoring"] = lean_scoring.measure(models, cfg, args.n, height, width)
        protect = None
        if not args.skip_protect:
            with attempt(figures, "protect_group check"):
                protect = protect_check(args, models, sd, workdir)
    return report(args, cfg, name, setup_s, peak_tflops, figures, protect)


def lambda_diagnostics(cfg: Any, figures: dict[str, Any], protect: dict[str, Any] | None) -> str:
    """Does λ still choose on this model? Distinct candidates per searched step, out of R + 1 (issue 20:
    with sign(), only ‖∇L_cons‖/‖∇L_re‖ decides, and it depends on the model, the weights and the size)."""
    from capray.attack.engine import lambda_stopped_choosing

    distinct = list(protect["distinct"]) if protect else []
    if "cap_step_distinct" in figures:
        distinct.append(figures["cap_step_distinct"])
    if not distinct:
        return "λ diagnostics: no CAP step was searched"
    collapsed = lambda_stopped_choosing(distinct, cfg.cap.ratio_max)
    return (f"λ diagnostics ({cfg.model.sd if cfg.model.is_tiny else 'full-size'} model, style weights "
            f"{cfg.model.style_weights}, {cfg.model.resolution} px): distinct candidates per searched step "
            f"{distinct} of {cfg.cap.ratio_max + 1}; λ stopped choosing: {collapsed}")


def aspl_static_memory_gb(models: Any, cfg: Any) -> dict[str, float]:
    """Weights and optimizer state ASPL holds while training the surrogate, from parameter counts (not
    measured): base networks in the model dtype, fp32 `main` and `sur` copies of UNet + text encoder
    (one copy with `surrogate.offload_main`), and fp32 gradients + two AdamW moments for what is trained."""
    count = {name: sum(p.numel() for p in getattr(models.parts, name).parameters())
             for name in ("unet", "text_encoder", "vae")}
    width = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}[cfg.model.dtype]
    copies = 1 if cfg.attack.surrogate.offload_main else 2
    trained = count["unet"] + (count["text_encoder"] if cfg.attack.surrogate.train_text_encoder else 0)
    parts = {
        "base_weights": width * sum(count.values()),
        "fp32_surrogate_copies": copies * 4 * (count["unet"] + count["text_encoder"]),
        "grads_and_adamw_state": 3 * 4 * trained,
    }
    out = {k: v / 1e9 for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def report(args: argparse.Namespace, cfg: Any, name: str, setup_s: float, peak_tflops: float,
           figures: dict[str, Any], protect: dict[str, Any] | None) -> int:
    """Print every figure (NaN where a piece failed), the projection and the RESULT line last."""
    nan = float("nan")
    ms = {k: figures["ms"].get(k, nan) for k in ("pgd_step", "pgd_step_checkpointed", "pgd_step_base_weights",
                                                  "cap_extra", "cap_step", "candidate", "surrogate_step",
                                                  "surrogate_copy")}
    flops = {k: figures["flops"].get(k, nan) for k in ("pgd_step", "cap_extra", "candidate", "surrogate_step")}
    peak = {k: figures["peak_gb"].get(k, nan) for k in ("pgd_step", "pgd_step_checkpointed", "cap_step",
                                                         "surrogate_train")}
    candidates = args.candidates or (cfg.cap.ratio_max + 1)
    plan = paper_plan(cfg, candidates)
    pieces = {f"{k}_ms": v for k, v in ms.items()}
    identity_s = project_identity(pieces, plan)
    identity_flops = project_flops(flops, plan)
    mfu = identity_flops / identity_s / (peak_tflops * 1e12)
    best = figures.get("best_batch")
    cand_images_per_s = figures["candidates"][best]["images_per_s"] if best else nan
    measured_peaks = [v for v in figures["peak_gb"].values() if math.isfinite(v)]
    peak_gb = protect["peak_gb"] if protect else max(measured_peaks, default=nan)

    def tflops(key: str) -> str:
        rate = flops[key] / (ms[key] / 1e3) / 1e12
        return f"{rate:8.2f} TFLOP/s  {rate / peak_tflops:6.1%} of peak"

    print(f"device {name}; dtype {cfg.model.dtype}; N={args.n} at {args.resolution}²; setup {setup_s:.1f} s")
    print(f"peak matmul ({args.matmul_n}³, {cfg.model.dtype}): {peak_tflops:.2f} TFLOP/s")
    print(f"PGD step (fp32 master, autocast) {ms['pgd_step']:9.2f} ms  {flops['pgd_step'] / 1e12:8.3f} TFLOP  "
          f"{tflops('pgd_step')}  peak {peak['pgd_step']:.2f} GB")
    print(f"PGD step, checkpointing          {ms['pgd_step_checkpointed']:9.2f} ms  "
          f"peak {peak['pgd_step_checkpointed']:.2f} GB")
    print(f"PGD step, {cfg.model.dtype} base weights        {ms['pgd_step_base_weights']:9.2f} ms")
    print(f"CAP extra (consistency grad)     {ms['cap_extra']:9.2f} ms  {flops['cap_extra'] / 1e12:8.3f} TFLOP")
    if "cap_step_distinct" in figures:
        d = figures["cap_step_distinct"]
        predicted = ms["pgd_step"] + ms["cap_extra"] + d * ms["candidate"]
        print(f"full CAP step ({d} distinct cand.) {ms['cap_step']:9.2f} ms  (pieces predict {predicted:.2f} ms)  "
              f"peak {peak['cap_step']:.2f} GB")
    for bs, v in figures["candidates"].items():
        print(f"candidates batch {bs:3d} ({bs * args.n:3d} images): {v['ms']:9.2f} ms  "
              f"{v['images_per_s']:9.1f} candidate-images/s  peak {v['peak_gb']:.2f} GB")
    print(f"candidate forward {flops['candidate'] / args.n / 1e12:.3f} TFLOP per image; best batch {best}: "
          f"{tflops('candidate')}")
    options = figures.get("options_ms", {})
    if options:
        reference = next(iter(options.values()))
        for option, value in options.items():
            if "compile time" in option:
                print(f"  candidate scoring, {option}: {value / 1e3:.1f} s")
            else:
                print(f"  candidate scoring, {option}: {value:.2f} ms per group candidate "
                      f"(×{reference / value:.2f} vs the engine now)")
    print(f"surrogate train step             {ms['surrogate_step']:9.2f} ms  "
          f"{flops['surrogate_step'] / 1e12:8.3f} TFLOP  {tflops('surrogate_step')}  "
          f"peak {peak['surrogate_train']:.2f} GB")
    print(f"surrogate copy                   {ms['surrogate_copy']:9.2f} ms")
    static = figures["static_gb"]
    print(f"ASPL weights + optimizer state by parameter count (not measured): {static['total']:.2f} GB = "
          + " + ".join(f"{k} {v:.2f}" for k, v in static.items() if k != "total") + " (before activations)")
    print(f"projection plan {json.dumps(plan)}: {identity_s:.1f} s per identity "
          f"({identity_flops / 1e15:.2f} PFLOP, {mfu:.1%} of peak)")
    transfer = figures.get("phase_transfer")
    if transfer:
        print(f"sharding, per PGD phase: {transfer['gb']:.3f} GB of UNet weights; "
              f"device→host {transfer['d2h_ms']:.1f} ms once, host→device {transfer['h2d_ms']:.1f} ms per scoring "
              "actor (+ the object store between nodes)")
    for n, v in figures.get("memory_by_n", {}).items():
        print(f"CAP step peak memory, N = {n:3d} photos (image_batch_size {cfg.attack.image_batch_size}): "
              f"{v['peak_gb']:.2f} GB  ({v['seconds']:.1f} s)")
    det = figures.get("deterministic")
    if det:
        print(f"model.deterministic: PGD step {det['pgd_step_ms']:.2f} → {det['pgd_step_deterministic_ms']:.2f} ms "
              f"(×{det['slowdown']:.2f}); two identical runs give identical pixels: {det['identical_pixels']}")
    lean = figures.get("lean_scoring")
    if lean:
        import lean_scoring

        print("\n".join(lean_scoring.describe(lean)))
    print(lambda_diagnostics(cfg, figures, protect))
    failed = False
    if lean and not lean["same"]:
        print("lean scoring: before and after chose different λ or pixels", file=sys.stderr)
        failed = True
    if det and not det["identical_pixels"]:
        print("model.deterministic: two identical runs gave different pixels", file=sys.stderr)
        failed = True
    if protect:
        verdict = "within" if protect["peak_gb"] <= 24 else "OVER"
        print(f"protect_group check (ASPL+CAP, checkpointing, {protect['pgd_steps']} PGD steps): "
              f"{protect['seconds']:.1f} s, peak {protect['peak_gb']:.2f} GB ({verdict} the 24 GB target), "
              f"L∞ {protect['linf_255']:.0f}/255 ≤ {protect['linf_budget_255']}: {protect['within_budget']}, "
              f"λ {protect['lambda_schedule']}, distinct {protect['distinct']}")
        if not protect["within_budget"]:
            print("protect_group check: the perturbation exceeds the L∞ budget", file=sys.stderr)
            failed = True
    for piece, error in figures["errors"].items():
        print(f"FAILED {piece}: {error}")
        failed = True
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "peak_tflops": peak_tflops, "figures": figures, "plan": plan, "pieces": pieces,
            "identity_s": identity_s, "identity_flops": identity_flops, "mfu": mfu,
            "candidates_per_s": cand_images_per_s, "peak_gb": peak_gb, "protect": protect,
        }, indent=1, default=str))
    values = [mfu, ms["pgd_step"], cand_images_per_s, identity_s, peak_gb]
    print(f"RESULT gpu_step device={name.replace(' ', '_')} mfu={mfu:.4f} step_ms={values[1]:.3f} "
          f"candidates_per_s={values[2]:.2f} identity_s={values[3]:.2f} peak_gb={values[4]:.3f}")
    return 1 if failed or not all(math.isfinite(v) for v in values) else 0


if __name__ == "__main__":
    sys.exit(main())
