"""`protect_group`: one identity group in, protected photos and a full record out. Pure torch.

The recipes follow Anti-DreamBooth (FSMG, ASPL) and SimAC; CAP adds the consistency loss and the
dynamic ratio from PGD step k̂ on. Everything random is drawn from generators seeded by
(seed, identity, purpose, step), so a group gives the same pixels wherever it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from capray.attack import cap as cap_search
from capray.attack.group import GroupLayout
from capray.attack.losses import FeatureTap, consistency_loss, feature_interference, reconstruction_loss
from capray.attack.metrics import image_metrics
from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw, draw_noise
from capray.attack.simac import select_timesteps
from capray.attack.surrogate import Surrogate, autocast_for, latent_shape_for, ensure_class_images, train_surrogate
from capray.config import CaprayConfig, ModelConfig
from capray.models.sd import DiffusionParts, encode_prompt, load_diffusion
from capray.models.style import StyleFeatures, load_style_network


@dataclass
class Models:
    """Everything a worker keeps resident: SD parts and the style network."""

    parts: DiffusionParts
    style: StyleFeatures
    config: ModelConfig

    @property
    def device(self) -> torch.device:
        return self.parts.device


def load_models(cfg: ModelConfig) -> Models:
    parts = load_diffusion(cfg)
    style = load_style_network(cfg, parts.device, parts.master_dtype)
    return Models(parts, style, cfg)


@dataclass
class StepRecord:
    step: int
    loss_re: float
    loss_cons: float | None = None
    ratio: int | float | None = None
    distinct: int | None = None


@dataclass
class ProtectResult:
    images: list[torch.Tensor]  # protected photos, (3, H, W) in [-1, 1], original sizes, on CPU
    steps: list[StepRecord]
    metrics: list[dict[str, float]]
    timings: dict[str, float]
    method: str
    cap_enabled: bool
    consistency_before: float
    consistency_after: float
    surrogate_mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def lambda_schedule(self) -> list[int | float | None]:
        return [s.ratio for s in self.steps]

    @property
    def loss_trajectory(self) -> list[float]:
        return [s.loss_re for s in self.steps]

    @property
    def distinct_counts(self) -> list[int]:
        return [s.distinct for s in self.steps if s.distinct is not None]


def _as_list(images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError("expected a (N, 3, H, W) tensor or a list of (3, H, W) tensors")
        return list(images)
    return list(images)


def _validate(images: list[torch.Tensor]) -> None:
    if not images:
        raise ValueError("an identity group needs at least one photo")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"photo {i}: expected shape (3, H, W), got {tuple(img.shape)}")
        if not torch.isfinite(img).all() or img.min() < -1 or img.max() > 1:
            raise ValueError(f"photo {i}: values must be finite and in [-1, 1]")


class GroupAttack:
    """State for protecting one group: the flat perturbed group, its origin, and the step record."""

    def __init__(self, models: Models, config: CaprayConfig, identity: str, images: list[torch.Tensor],
                 references: list[torch.Tensor] | None, evaluator_factory: Callable[..., Any] | None):
        self.m, self.cfg, self.identity = models, config, identity
        self.on_step: Callable[[int, int], None] | None = None  # progress (steps done, total) for front doors
        self.parts = models.parts
        self.res = config.model.resolution
        self.layout = GroupLayout.of(images)
        device = self.parts.device
        work = self.parts.master_dtype
        self.x0 = self.layout.flatten([img.to(work) for img in images]).to(device)
        self.x = self.x0.clone()
        ref_list = references if references else images
        ref_layout = GroupLayout.of(ref_list)
        self.references = ref_layout.to_model(ref_layout.flatten([r.to(work) for r in ref_list]).to(device), self.res)
        self.latent_shape = latent_shape_for(self.parts, self.res)
        self.evaluator_factory = evaluator_factory
        a, c = config.attack, config.cap
        self.k_hat = int(round(c.start_fraction * a.total_pgd_steps))
        self.cap_on = c.enabled and self.layout.n >= 2
        self.steps: list[StepRecord] = []
        self.notes: list[str] = []
        self.timings = {"surrogate_s": 0.0, "pgd_s": 0.0, "search_s": 0.0, "select_s": 0.0}
        self.pools: list[torch.Tensor] | None = None
        if c.enabled and self.layout.n < 2:
            self.notes.append("CAP skipped: a one-photo group has no cross-image consistency to optimise "
                              "(the loss is identically 0); the baseline attack ran alone")

    # -- losses --------------------------------------------------------------------------------
    def draw_for_step(self, k: int) -> NoiseDraw:
        return draw_noise(self.layout.n, self.latent_shape, self.cfg.seed, self.identity, "pgd", k,
                          num_train_timesteps=self.parts.scheduler.config.num_train_timesteps,
                          timestep_pools=self.pools)

    def consistency(self, model_in: torch.Tensor) -> torch.Tensor:
        c = self.cfg.cap
        return consistency_loss(self.m.style, model_in, kind=c.loss, normalization=c.gram_normalization)

    def _attack_losses(self, net: Surrogate, cond: torch.Tensor, x: torch.Tensor, draw: NoiseDraw,
                       clean_feats: list[torch.Tensor] | None, tap: FeatureTap | None):
        """(L_re, the method's attack loss, model input) for flat x, differentiable w.r.t. x."""
        model_in = self.layout.to_model(x, self.res)
        with autocast_for(self.parts):
            if tap is not None:
                tap.capture()
            l_re = reconstruction_loss(self.parts, net.unet, cond, model_in, draw).sum()
            attack = l_re
            if tap is not None:
                feat = feature_interference(tap.release(), clean_feats)
                s = self.cfg.attack.simac
                attack = attack + s.feature_weight * (feat.detach() if s.feature_detach else feat)
        return l_re, attack, model_in

    # -- one PGD phase --------------------------------------------------------------------------
    def pgd_phase(self, net: Surrogate, steps: int, simac_features: bool = False) -> None:
        a, c = self.cfg.attack, self.cfg.cap
        t0 = time.perf_counter()
        if self.parts.device.type == "cuda" and not self.cfg.model.gradient_checkpointing:
            net = net.compute_copy(self.parts.dtype)  # speed; the memory-saving profile skips the extra copy
        with torch.no_grad():
            cond = encode_prompt(self.parts, a.instance_prompt, text_encoder=net.text_encoder)
        tap = FeatureTap(net.unet) if simac_features else None
        x_phase_start = self.x.detach().clone()

        def candidate_loss(candidates: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
            with autocast_for(self.parts):
                return reconstruction_loss(self.parts, net.unet, cond, self.layout.to_model(candidates, self.res), draw)

        evaluator = cap_search.make_evaluator(
            candidate_loss, self.layout.n, c.candidate_batch_size, self.evaluator_factory,
            cap_search.EvaluationContext(net.unet, cond, self.layout, self.res))
        try:
            for _ in range(steps):
                k = len(self.steps)
                draw = self.draw_for_step(k)
                clean_feats = None
                if tap is not None:  # SimAC: features of the phase's starting point under the same draw
                    with torch.no_grad():
                        tap.capture()
                        candidate_loss(x_phase_start.unsqueeze(0), draw)
                        clean_feats = tap.release()
                self.pgd_step(net, cond, draw, k, evaluator, clean_feats, tap)
                if self.on_step is not None:
                    self.on_step(len(self.steps), self.cfg.attack.total_pgd_steps)
        finally:
            if tap is not None:
                tap.remove()
        self.timings["pgd_s"] += time.perf_counter() - t0

    def pgd_step(self, net, cond, draw, k, evaluator, clean_feats, tap) -> None:
        a, c = self.cfg.attack, self.cfg.cap
        xr = self.x.detach().requires_grad_(True)
        l_re, attack, model_in = self._attack_losses(net, cond, xr, draw, clean_feats, tap)
        record = StepRecord(step=k, loss_re=l_re.item())
        if not (self.cap_on and k >= self.k_hat):
            (grad,) = torch.autograd.grad(attack, xr)
            self.x = sign_step(self.x, self.x0, grad, a.alpha, a.eps).detach()
            self.steps.append(record)
            return
        l_cons = self.consistency(model_in)
        record.loss_cons = l_cons.item()
        if c.ratio_mode == "static":
            (grad,) = torch.autograd.grad(attack - c.static_ratio * l_cons, xr)
            self.x = sign_step(self.x, self.x0, grad, a.alpha, a.eps).detach()
            record.ratio = c.static_ratio
            self.steps.append(record)
            return
        t0 = time.perf_counter()
        ratios = range(0, c.ratio_max + 1)
        if c.search == "fast":
            grad_re, grad_cons = torch.autograd.grad(attack, xr, retain_graph=True)[0], torch.autograd.grad(l_cons, xr)[0]
            result = cap_search.fast_search(self.x.detach(), self.x0, grad_re, grad_cons, ratios, a.alpha, a.eps,
                                            evaluator, draw, c.candidate_batch_size)
        else:
            del l_re, attack, model_in, l_cons

            def combined_grad(x: torch.Tensor, r: float) -> torch.Tensor:
                xg = x.detach().requires_grad_(True)
                _, attack_r, model_in_r = self._attack_losses(net, cond, xg, draw, clean_feats, tap)
                return torch.autograd.grad(attack_r - r * self.consistency(model_in_r), xg)[0]

            result = cap_search.reference_search(self.x.detach(), self.x0, combined_grad, ratios, a.alpha, a.eps,
                                                 evaluator, draw)
        self.timings["search_s"] += time.perf_counter() - t0
        self.x = result.next_x.detach()
        record.ratio, record.distinct = result.ratio, result.distinct
        self.steps.append(record)

    # -- recipes ----------------------------------------------------------------------------------
    def train(self, net: Surrogate, images: torch.Tensor, class_images: torch.Tensor | None, steps: int,
              tag: tuple[Any, ...]) -> None:
        t0 = time.perf_counter()
        a = self.cfg.attack
        train_surrogate(net, self.parts, images, class_images, a.surrogate, a.instance_prompt, steps,
                        (self.cfg.seed, self.identity, "train", *tag))
        self.timings["surrogate_s"] += time.perf_counter() - t0

    def model_view(self) -> torch.Tensor:
        return self.layout.to_model(self.x, self.res).detach()

    def run(self) -> None:
        a = self.cfg.attack
        needs_class = a.surrogate.prior_preservation and (a.method != "fsmg" or not a.fsmg_model)
        class_images = ensure_class_images(self.parts, a.surrogate, self.res) if needs_class else None
        if a.method == "fsmg":
            if a.fsmg_model:
                tuned = load_diffusion(replace_model(self.cfg.model, a.fsmg_model))
                net = Surrogate.from_parts(tuned)
            else:
                net = Surrogate.from_parts(self.parts)
                self.train(net, self.references, class_images, a.fsmg_train_steps, ("fsmg",))
            self.pgd_phase(net, a.pgd_steps)
            return
        if a.method == "simac":
            self.select_simac_timesteps()
        offload = a.surrogate.offload_main
        main = Surrogate.from_parts(self.parts)
        work = main.copy()  # the device copy that trains and that PGD attacks
        if offload:
            main.to("cpu")
        for i in range(a.outer_loops):
            work.load_from(main)  # f_sur = copy(f)
            self.train(work, self.references, class_images, a.surrogate_steps, ("clean", i))
            self.pgd_phase(work, a.adv_steps, simac_features=a.method == "simac")
            if offload:  # f trains on the device copy, then goes back to host memory
                self.train(work.load_from(main), self.model_view(), class_images, a.surrogate_steps, ("perturbed", i))
                main.load_from(work)
            else:
                self.train(main, self.model_view(), class_images, a.surrogate_steps, ("perturbed", i))

    def select_simac_timesteps(self) -> None:
        t0 = time.perf_counter()
        a = self.cfg.attack
        base = Surrogate(self.parts.unet, self.parts.text_encoder)
        with torch.no_grad():
            cond = encode_prompt(self.parts, a.instance_prompt)
        sizes = self.layout.sizes()
        images = [part.view(shape) for part, shape in zip(self.x0.split(sizes), self.layout.shapes)]

        def image_loss(x: torch.Tensor, i: int, t: int) -> torch.Tensor:
            draw = draw_noise(1, self.latent_shape, self.cfg.seed, self.identity, "simac-select", i, t,
                              fixed_timestep=t)
            model_in = GroupLayout.of([x]).to_model(x.reshape(-1), self.res)
            with autocast_for(self.parts):
                return reconstruction_loss(self.parts, base.unet, cond, model_in, draw).sum()

        self.pools = select_timesteps(image_loss, images, a.simac, a.alpha, a.eps,
                                      self.parts.scheduler.config.num_train_timesteps,
                                      (self.cfg.seed, self.identity, "simac-select"))
        self.timings["select_s"] += time.perf_counter() - t0


def replace_model(cfg: ModelConfig, sd: str) -> ModelConfig:
    return cfg.model_copy(update={"sd": sd})


def protect_group(
    images: torch.Tensor | list[torch.Tensor],
    config: CaprayConfig | None = None,
    *,
    identity: str = "group",
    models: Models | None = None,
    references: torch.Tensor | list[torch.Tensor] | None = None,
    evaluator_factory: Callable[..., Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ProtectResult:
    """Protect one identity group.

    `images`: the group's photos in [-1, 1], (N, 3, H, W) or a list of (3, H, W) of any sizes — the
    perturbation is optimised at each photo's own resolution. `references`: clean photos for the
    surrogate (default: the group itself, which is what a user has; Anti-DreamBooth's protocol uses a
    separate set A). `models`: preloaded `Models` (a worker loads them once); loaded from the config
    otherwise. `evaluator_factory`: how λ candidates are scored (default: in-process, batched).
    `progress(done, total)` is called after every PGD step (the online endpoint reports it).
    """
    config = config or CaprayConfig()
    photos = _as_list(images)
    _validate(photos)
    refs = _as_list(references) if references is not None else None
    if refs is not None:
        _validate(refs)
    models = models or load_models(config.model)
    start = time.perf_counter()
    attack = GroupAttack(models, config, identity, photos, refs, evaluator_factory)
    attack.on_step = progress
    with torch.no_grad():
        before = float(attack.consistency(attack.model_view())) if attack.layout.n >= 2 else 0.0
    attack.run()
    with torch.no_grad():
        after = float(attack.consistency(attack.model_view())) if attack.layout.n >= 2 else 0.0
    if models.device.type == "cuda":
        torch.cuda.synchronize()
    attack.timings["total_s"] = time.perf_counter() - start
    protected = [img.detach().float().cpu() for img in attack.layout.unflatten(attack.x)]
    metrics = [image_metrics(clean, prot) for clean, prot in zip(photos, protected)]
    return ProtectResult(
        images=protected, steps=attack.steps, metrics=metrics, timings=attack.timings,
        method=config.attack.method, cap_enabled=attack.cap_on, consistency_before=before,
        consistency_after=after, surrogate_mode="fp32-master", notes=attack.notes,
    )
