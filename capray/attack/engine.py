"""`protect_group`: one identity group in, protected photos and a full record out. Pure torch.

The recipes follow Anti-DreamBooth (FSMG, ASPL) and SimAC; CAP adds the consistency loss and the
dynamic ratio from PGD step k̂ on. Everything random is drawn from generators seeded by
(seed, identity, purpose, step), so a group gives the same pixels wherever it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from capray.attack import cap as cap_search
from capray.attack import guard
from capray.attack.group import GroupLayout
from capray.attack.losses import FeatureTap, consistency_part, feature_interference, reconstruction_loss, style_stats
from capray.attack.metrics import image_metrics
from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw, draw_noise
from capray.attack.simac import select_timesteps
from capray.attack.surrogate import Surrogate, autocast_for, latent_shape_for, train_surrogate
from capray.config import CaprayConfig, ModelConfig, SurrogateConfig
from capray.models.class_images import ensure_class_images
from capray.models.sd import DiffusionParts, encode_prompt, load_diffusion
from capray.models.style import StyleFeatures, load_style_network

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Everything a worker keeps resident: SD parts and the style network."""

    parts: DiffusionParts
    style: StyleFeatures
    config: ModelConfig
    _compute: Surrogate | None = field(default=None, init=False, repr=False)  # the copy PGD phases borrow
    _compute_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    def borrow_compute_copy(self, net: Surrogate) -> tuple[Surrogate, Callable[[], None]]:
        """`net`'s weights in the compute dtype for one PGD phase, and how to give them back.

        Under autocast, fp32 weights are re-cast on every forward; one cast per phase is cheaper. The
        copy is allocated once per `Models` (per actor) and refreshed in place every phase, instead of
        a fresh deep copy each time (50 per ASPL group, ~5 GB transient for SD 2.1). A second group in
        the same process at the same time gets its own copy rather than waiting.
        """
        dtype = self.parts.dtype
        if dtype == next(net.unet.parameters()).dtype:
            return net, lambda: None
        if not self._compute_lock.acquire(blocking=False):
            return net.compute_copy(dtype), lambda: None
        try:
            if self._compute is None or not self._compute.same_layout(net):
                self._compute = None  # an FSMG model of another architecture: its own copy
                self._compute = net.compute_copy(dtype)
            else:
                self._compute.load_from(net)
        except BaseException:
            self._compute_lock.release()
            raise
        return self._compute, self._compute_lock.release


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
class GroupResult:
    """What `protect_group` returns for one group: tensors and records (`attack.api` turns it into a record)."""

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
    fixed_members: int = 0  # published photos that entered the style mean without being updated
    ratio_max: int = 0  # R of the λ search (for `lambda_collapsed`)

    @property
    def lambda_schedule(self) -> list[int | float | None]:
        return [s.ratio for s in self.steps]

    @property
    def loss_trajectory(self) -> list[float]:
        return [s.loss_re for s in self.steps]

    @property
    def distinct_counts(self) -> list[int]:
        return [s.distinct for s in self.steps if s.distinct is not None]

    @property
    def lambda_collapsed(self) -> bool | None:
        """λ stopped choosing (`lambda_stopped_choosing`); None when no step searched λ."""
        return lambda_stopped_choosing(self.distinct_counts, self.ratio_max) if self.distinct_counts else None


COLLAPSED_DISTINCT = 2  # at most this many distinct candidates: the search only decides "λ = 0 or not"


def lambda_stopped_choosing(distinct: list[int], ratio_max: int) -> bool:
    """Most searched steps had ≤ 2 distinct λ candidates out of R + 1.

    With sign(), only the ratio ‖∇L_cons‖ / ‖∇L_re‖ decides how many r give different updates; when it
    is far from 1/R..1 (Gram scale, layer sum, resolution), every r ≥ 1 gives one update and the
    dynamic ratio degenerates to "consistency on or off". Nothing fails then, so it must be said.
    """
    if ratio_max + 1 <= COLLAPSED_DISTINCT or not distinct:
        return False
    return collapsed_steps(distinct) * 2 > len(distinct)


def collapsed_steps(distinct: list[int]) -> int:
    """Searched steps whose λ candidates gave at most COLLAPSED_DISTINCT different updates."""
    return sum(d <= COLLAPSED_DISTINCT for d in distinct)


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


@dataclass
class Phase:
    """What one PGD phase attacks: the network, its prompt embedding, SimAC's feature tap and starting point."""

    net: Surrogate
    cond: torch.Tensor
    evaluator: cap_search.CandidateEvaluator
    tap: FeatureTap | None = None  # SimAC: decoder features of the perturbed vs the phase's starting photos
    start: torch.Tensor | None = None
    release: Callable[[], None] = lambda: None  # gives a borrowed compute copy back when the phase ends


@dataclass
class Gradients:
    """One PGD step's gradients w.r.t. the flat group and its scalar losses: all a λ search keeps."""

    attack: torch.Tensor
    consistency: torch.Tensor | None
    loss_re: float
    loss_cons: float | None


class GroupAttack:
    """State for protecting one group: the flat perturbed group, its origin, and the step record.

    `fixed`: photos of the same person that are already published as protected (append mode). They
    are members of the group for CAP — in the style mean S̄ and in the consistency loss, so the new
    photos are pulled toward the style the person's published photos have — but are never updated:
    PGD, λ scoring and L_re run on the new photos only (a fixed photo's L_re is the same for every
    candidate, so leaving it out changes no λ under shared draws). The surrogate sees what an attacker
    would hold: the published photos as published, beside the new photos (clean for the reference
    model, perturbed for ASPL's f).
    """

    def __init__(self, models: Models, config: CaprayConfig, identity: str, images: list[torch.Tensor],
                 references: list[torch.Tensor] | None, evaluator_factory: Callable[..., Any] | None,
                 fixed: list[torch.Tensor] | None = None):
        self.models, self.cfg, self.identity = models, config, identity
        self.on_step: Callable[[int, int], None] | None = None  # progress (steps done, total) for front doors
        self.parts = models.parts
        self.resolution = config.model.resolution
        self.layout = GroupLayout.of(images)
        device = self.parts.device
        work = self.parts.master_dtype
        self.x0 = self.layout.flatten([img.to(work) for img in images]).to(device)
        self.x = self.x0.clone()
        fixed = list(fixed or [])
        self.fixed_layout = GroupLayout.of(fixed)
        self.fixed_x = (self.fixed_layout.flatten([img.to(work) for img in fixed]).to(device) if fixed
                        else self.x0.new_zeros(0))
        self.group_size = self.layout.n + self.fixed_layout.n  # N of CAP's mean: new and fixed photos
        self._fixed_style_sums: list[torch.Tensor] | None = None
        self._fixed_view: torch.Tensor | None = None
        ref_list = references if references else [*images, *fixed]
        ref_layout = GroupLayout.of(ref_list)
        self.references = ref_layout.to_model(ref_layout.flatten([r.to(work) for r in ref_list]).to(device),
                                              self.resolution)
        self.latent_shape = latent_shape_for(self.parts, self.resolution)
        self.evaluator_factory = evaluator_factory
        a, c = config.attack, config.cap
        self.k_hat = int(round(c.start_fraction * a.total_pgd_steps))
        self.cap_on = c.enabled and self.group_size >= 2
        self.cons_sign = 1.0 if c.consistency_sign == "descend" else -1.0
        self.steps: list[StepRecord] = []
        self.notes: list[str] = []
        self.timings = {"surrogate_s": 0.0, "pgd_s": 0.0, "search_s": 0.0, "select_s": 0.0}
        self.pools: list[torch.Tensor] | None = None  # SimAC's per-photo timestep pools
        if c.enabled and self.group_size < 2:
            self.notes.append("CAP skipped: a one-photo group has no cross-image consistency to optimise "
                              "(the loss is identically 0); the baseline attack ran alone")

    # -- randomness ------------------------------------------------------------------------------
    def draw(self, *purpose: object) -> NoiseDraw:
        """One draw for the whole group, seeded by (seed, identity, *purpose); with `attack.robust` on it
        carries each photo's transform too, so the attack and the λ scores see the photos transformed."""
        return draw_noise(self.layout.n, self.latent_shape, self.cfg.seed, self.identity, *purpose,
                          num_train_timesteps=self.parts.scheduler.config.num_train_timesteps,
                          timestep_pools=self.pools, robust=self.cfg.attack.robust)

    def draw_for_step(self, k: int) -> NoiseDraw:
        """The (first) draw PGD step k takes its gradients on."""
        return self.draw("pgd", k)

    def step_draws(self, k: int) -> list[NoiseDraw]:
        """Every draw of step k's gradient: one, or `attack.robust.samples` EOT samples (the mean of theirs)."""
        robust = self.cfg.attack.robust
        extra = robust.samples - 1 if robust.enabled else 0
        return [self.draw_for_step(k), *(self.draw("pgd", k, "eot", s) for s in range(1, extra + 1))]

    def scorer(self, phase: Phase, k: int, gradient_draws: list[NoiseDraw]) -> cap_search.CandidateScorer:
        """How step k's λ candidates are scored (`cap.score_draw`, `cap.score_draws`)."""
        c = self.cfg.cap
        if c.score_draw == "gradient":
            return cap_search.CandidateScorer(phase.evaluator, lambda r: gradient_draws, shared=True)
        if c.score_draw == "fresh":
            draws = [self.draw("score", k, j) for j in range(c.score_draws)]
            return cap_search.CandidateScorer(phase.evaluator, lambda r: draws, shared=True)
        return cap_search.CandidateScorer(
            phase.evaluator, lambda r: [self.draw("score", k, "ratio", r, j) for j in range(c.score_draws)],
            shared=False)

    # -- losses, over micro-batches of photos -----------------------------------------------------
    def style_stats(self, model_in: torch.Tensor) -> list[torch.Tensor]:
        c = self.cfg.cap
        return style_stats(self.models.style, model_in, kind=c.loss, normalization=c.gram_normalization)

    def photo_batches(self, layout: GroupLayout | None = None):
        return (layout or self.layout).batches(self.cfg.attack.image_batch_size)

    def batch_styles(self, layout: GroupLayout, flat: torch.Tensor):
        """Style statistics of each micro-batch of the photos `flat` lays out (no grad)."""
        for batch in self.photo_batches(layout):
            yield self.style_stats(batch.layout.to_model(flat[batch.flat], self.resolution))

    @torch.no_grad()
    def style_sums(self, layout: GroupLayout, flat: torch.Tensor) -> list[torch.Tensor] | None:
        sums: list[torch.Tensor] | None = None
        for stats in self.batch_styles(layout, flat):
            sums = [s.sum(dim=0) for s in stats] if sums is None else [a + s.sum(dim=0) for a, s in zip(sums, stats)]
        return sums

    @torch.no_grad()
    def mean_style(self, x: torch.Tensor) -> list[torch.Tensor]:
        """S̄: the group's mean style statistics at x (and the fixed photos), over micro-batches."""
        sums = self.style_sums(self.layout, x)
        if self.fixed_layout.n:  # the fixed photos never change: their share is computed once
            if self._fixed_style_sums is None:
                self._fixed_style_sums = self.style_sums(self.fixed_layout, self.fixed_x)
            sums = [a + b for a, b in zip(sums, self._fixed_style_sums)]
        return [s / self.group_size for s in sums]

    @torch.no_grad()
    def consistency(self, x: torch.Tensor) -> float:
        """L_cons of the whole group (CAP Eq. 14–15): the photos x and the fixed ones."""
        means = self.mean_style(x)
        parts = [*self.batch_styles(self.layout, x), *self.batch_styles(self.fixed_layout, self.fixed_x)]
        return float(sum(consistency_part(stats, means, self.group_size) for stats in parts))

    def attack_losses(self, phase: Phase, model_in: torch.Tensor, draw: NoiseDraw,
                      batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_re, the method's attack loss) of one micro-batch of photos, differentiable w.r.t. model_in."""
        with autocast_for(self.parts):
            if phase.tap is None:
                l_re = reconstruction_loss(self.parts, phase.net.unet, phase.cond, model_in, draw).sum()
                return l_re, l_re
            with torch.no_grad():  # SimAC: the phase's starting photos under the same draw (and transforms)
                phase.tap.capture()
                start = batch.layout.to_model(phase.start[batch.flat], self.resolution, draw.augments)
                reconstruction_loss(self.parts, phase.net.unet, phase.cond, start, draw)
                clean = phase.tap.release()
            phase.tap.capture()
            l_re = reconstruction_loss(self.parts, phase.net.unet, phase.cond, model_in, draw).sum()
            s = self.cfg.attack.simac
            feat = feature_interference(phase.tap.release(), clean, share=(batch.stop - batch.start) / self.layout.n,
                                        reduction=s.feature_reduction)
            return l_re, l_re + s.feature_weight * feat

    def gradients(self, phase: Phase, x: torch.Tensor, draws: NoiseDraw | list[NoiseDraw], *, consistency: bool,
                  combined_ratio: float | None = None) -> Gradients:
        """∇ of the attack loss (and of L_cons) w.r.t. flat x, accumulated over micro-batches of photos.

        Each micro-batch's graph is freed by its own backward, so only gradients and scalars outlive
        it. With `combined_ratio` r, one backward of (attack − r·L_cons) per micro-batch instead
        (Algorithm 1's combined loss, for the reference search). `consistency` is the gradient of
        s·L_cons with s = +1 for `cap.consistency_sign: descend` and −1 for `ascend`, so every update
        is x + α·sign(∇attack − r·consistency) under either reading.

        Several `draws` (robust mode's EOT samples): the attack loss is their mean, one forward and
        backward each. The attack loss sees each photo through its draw's transform; the style
        statistics (S̄ and L_cons) see the photos as written, so the consistency term is one whatever
        the draws, and the λ candidates stay linear in r.
        """
        draws = [draws] if isinstance(draws, NoiseDraw) else list(draws)
        weight = 1.0 / len(draws)
        grad_attack = torch.zeros_like(x)
        grad_cons = torch.zeros_like(x) if consistency and combined_ratio is None else None
        means = self.mean_style(x) if consistency else None
        loss_re, loss_cons = 0.0, 0.0
        for batch in self.photo_batches():
            xs = x[batch.flat].detach().requires_grad_(True)
            for s, draw in enumerate(draws):
                rows = draw.rows(batch.start, batch.stop)
                model_in = batch.layout.to_model(xs, self.resolution, rows.augments)
                l_re, attack = self.attack_losses(phase, model_in, rows, batch)
                loss_re += l_re.item() * weight
                objective = attack * weight
                if combined_ratio is not None and s == 0:
                    style_in = model_in if rows.augments is None else batch.layout.to_model(xs, self.resolution)
                    l_cons = consistency_part(self.style_stats(style_in), means, self.group_size)
                    loss_cons += l_cons.item()
                    objective = objective - combined_ratio * self.cons_sign * l_cons
                (grad,) = torch.autograd.grad(objective, xs)
                grad_attack[batch.flat] += grad
            if grad_cons is not None:
                model_in = batch.layout.to_model(xs, self.resolution)
                l_cons = consistency_part(self.style_stats(model_in), means, self.group_size)
                loss_cons += l_cons.item()
                (grad_cons[batch.flat],) = torch.autograd.grad(self.cons_sign * l_cons, xs)
        return Gradients(grad_attack, grad_cons, loss_re, loss_cons if consistency else None)

    # -- one PGD phase ----------------------------------------------------------------------------
    def start_phase(self, net: Surrogate, simac_features: bool = False) -> Phase:
        release: Callable[[], None] = lambda: None  # noqa: E731
        if self.parts.device.type == "cuda" and not self.cfg.model.gradient_checkpointing:
            net, release = self.models.borrow_compute_copy(net)  # speed; the memory-saving profile skips it
        try:
            return self._phase_on(net, simac_features, release)
        except BaseException:
            release()
            raise

    def _phase_on(self, net: Surrogate, simac_features: bool, release: Callable[[], None]) -> Phase:
        with torch.no_grad():
            cond = encode_prompt(self.parts, self.cfg.attack.instance_prompt, text_encoder=net.text_encoder)

        def image_loss(images: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
            with autocast_for(self.parts):
                return reconstruction_loss(self.parts, net.unet, cond, images, draw)

        context = cap_search.EvaluationContext(net.unet, cond, self.layout, self.resolution)
        evaluator = cap_search.make_evaluator(image_loss, context, self.cfg.cap.score_image_batch_size,
                                              self.evaluator_factory)
        tap = FeatureTap(net.unet) if simac_features else None
        return Phase(net, cond, evaluator, tap, self.x.detach().clone() if tap else None, release)

    def pgd_phase(self, net: Surrogate, steps: int, simac_features: bool = False) -> None:
        t0 = time.perf_counter()
        phase = self.start_phase(net, simac_features)
        try:
            for _ in range(steps):
                self.pgd_step(phase)
                if self.on_step is not None:
                    self.on_step(len(self.steps), self.cfg.attack.total_pgd_steps)
        finally:
            if phase.tap is not None:
                phase.tap.remove()
            close = getattr(phase.evaluator, "close", None)
            if close is not None:  # e.g. scoring peers drop this phase's weights
                close()
            phase.release()
        self.timings["pgd_s"] += time.perf_counter() - t0

    def pgd_step(self, phase: Phase) -> None:
        """One PGD step: plain, static-ratio CAP, or CAP with the λ search; appends its record."""
        a, c = self.cfg.attack, self.cfg.cap
        k = len(self.steps)
        draws = self.step_draws(k)
        with_cap = self.cap_on and k >= self.k_hat
        grads = self.gradients(phase, self.x, draws, consistency=with_cap)
        record = StepRecord(step=k, loss_re=grads.loss_re, loss_cons=grads.loss_cons)
        scores: list[float] = []
        if not with_cap:
            self.x = sign_step(self.x, self.x0, grads.attack, a.alpha, a.eps)
        elif c.ratio_mode == "static":
            self.x = sign_step(self.x, self.x0, grads.attack - c.static_ratio * grads.consistency, a.alpha, a.eps)
            record.ratio = c.static_ratio
        else:
            t0 = time.perf_counter()
            result = self.search_ratio(phase, k, draws, grads)
            self.timings["search_s"] += time.perf_counter() - t0
            self.x = result.next_x
            record.ratio, record.distinct = result.ratio, result.distinct
            scores = list(result.losses.values())
        self.x = self.x.detach()
        self.check_finite(k, grads, scores)
        self.steps.append(record)

    def check_finite(self, k: int, grads: Gradients, scores: list[float]) -> None:
        """The non-finite guard (`capray.attack.guard`): losses, gradients, λ scores and the new x of step
        k, in that order, so the error names the first place a NaN appeared."""
        guard.check(k, self.parts.dtype, [
            ("the reconstruction loss", grads.loss_re), ("the consistency loss", grads.loss_cons),
            ("the attack loss's gradient", grads.attack), ("the consistency loss's gradient", grads.consistency),
            ("the λ candidates' scores", scores), ("the updated photos", self.x)])

    def search_ratio(self, phase: Phase, k: int, draws: list[NoiseDraw],
                     grads: Gradients) -> cap_search.SearchResult:
        a, c = self.cfg.attack, self.cfg.cap
        ratios = range(0, c.ratio_max + 1)
        scorer = self.scorer(phase, k, draws)
        x = self.x.detach()
        if c.search == "fast":
            return cap_search.fast_search(x, self.x0, grads.attack, grads.consistency, ratios, a.alpha, a.eps,
                                          scorer, c.candidate_batch_size)

        def combined_grad(x_r: torch.Tensor, r: float) -> torch.Tensor:
            return self.gradients(phase, x_r, draws, consistency=True, combined_ratio=r).attack

        return cap_search.reference_search(x, self.x0, combined_grad, ratios, a.alpha, a.eps, scorer)

    # -- recipes ----------------------------------------------------------------------------------
    def train(self, net: Surrogate, images: torch.Tensor, class_images: torch.Tensor | None, steps: int,
              tag: tuple[Any, ...], surrogate: SurrogateConfig | None = None, shuffle: bool = False) -> None:
        t0 = time.perf_counter()
        a = self.cfg.attack
        train_surrogate(net, self.parts, images, class_images, surrogate or a.surrogate, a.instance_prompt, steps,
                        (self.cfg.seed, self.identity, "train", *tag), shuffle=shuffle)
        self.timings["surrogate_s"] += time.perf_counter() - t0

    def model_view(self) -> torch.Tensor:
        """The group as an attacker holds it now, at model resolution: the perturbed and the fixed photos."""
        view = self.layout.to_model(self.x, self.resolution).detach()
        if not self.fixed_layout.n:
            return view
        if self._fixed_view is None:  # they never change: resized once per group
            self._fixed_view = self.fixed_layout.to_model(self.fixed_x, self.resolution)
        return torch.cat([view, self._fixed_view])

    def new_surrogate(self, parts: DiffusionParts | None = None) -> Surrogate:
        return Surrogate.from_parts(parts or self.parts, self.cfg.attack.surrogate.master_weights)

    def class_images(self) -> torch.Tensor | None:
        a = self.cfg.attack
        needs_class = a.surrogate.prior_preservation and (a.method != "fsmg" or not a.fsmg_model)
        return ensure_class_images(self.parts, a.surrogate, self.resolution) if needs_class else None

    def run(self) -> None:
        self._fsmg() if self.cfg.attack.method == "fsmg" else self._aspl()

    def _fsmg(self) -> None:
        """Anti-DreamBooth FSMG: PGD against the frozen `fsmg_surrogate`."""
        self.pgd_phase(self.fsmg_surrogate(), self.cfg.attack.pgd_steps)

    def fsmg_surrogate(self) -> Surrogate:
        """FSMG's target: DreamBooth on the clean references (batch 2 + 2 class images, shuffled), or
        `attack.fsmg_model`. Seeded, so a benchmark can rebuild the very model a run attacked."""
        a = self.cfg.attack
        if a.fsmg_model:
            return self.new_surrogate(load_diffusion(self.cfg.model.model_copy(update={"sd": a.fsmg_model})))
        net = self.new_surrogate()
        fsmg_training = a.surrogate.model_copy(update={"batch_size": a.fsmg_batch_size})
        self.train(net, self.references, self.class_images(), a.fsmg_train_steps, ("fsmg",),
                   surrogate=fsmg_training, shuffle=True)
        return net

    def _aspl(self) -> None:
        """ASPL (and SimAC on top of it): every outer loop, f_sur = copy(f) trains on the clean references,
        PGD attacks f_sur, then f trains on the perturbed photos."""
        a = self.cfg.attack
        class_images = self.class_images()
        if a.method == "simac":
            self.select_simac_timesteps()
        offload = a.surrogate.offload_main
        main = self.new_surrogate()
        work = main.copy()  # the device copy that trains and that PGD attacks
        if offload:
            main.to("cpu")
        for i in range(a.outer_loops):
            work.load_from(main)  # f_sur = copy(f)
            self.train(work, self.references, class_images, a.surrogate_steps, ("clean", i))
            # SimAC's public code adds its feature loss detached (`simac.feature_detach`): a constant, which
            # changes no gradient, so it is not computed at all then
            self.pgd_phase(work, a.adv_steps, simac_features=a.method == "simac" and not a.simac.feature_detach)
            if offload:  # f trains on the device copy, then goes back to host memory
                self.train(work.load_from(main), self.model_view(), class_images, a.surrogate_steps, ("perturbed", i))
                main.load_from(work)
            else:
                self.train(main, self.model_view(), class_images, a.surrogate_steps, ("perturbed", i))

    def surrogate_mode(self) -> str:
        """Which weights the surrogate trained, for the manifest."""
        if self.cfg.attack.surrogate.master_weights == "model":
            return f"{self.cfg.model.dtype}-weights"
        return {torch.float32: "fp32-master", torch.float64: "fp64-master"}[self.parts.master_dtype]

    def select_simac_timesteps(self) -> None:
        t0 = time.perf_counter()
        a = self.cfg.attack
        base = Surrogate(self.parts.unet, self.parts.text_encoder)
        with torch.no_grad():
            cond = encode_prompt(self.parts, a.instance_prompt)
        images = self.layout.unflatten(self.x0)

        def image_loss(x: torch.Tensor, i: int, t: int) -> torch.Tensor:
            draw = draw_noise(1, self.latent_shape, self.cfg.seed, self.identity, "simac-select", i, t,
                              fixed_timestep=t)
            model_in = GroupLayout.of([x]).to_model(x.reshape(-1), self.resolution)
            with autocast_for(self.parts):
                return reconstruction_loss(self.parts, base.unet, cond, model_in, draw).sum()

        self.pools = select_timesteps(image_loss, images, a.simac, a.alpha, a.eps,
                                      self.parts.scheduler.config.num_train_timesteps,
                                      (self.cfg.seed, self.identity, "simac-select"))
        self.timings["select_s"] += time.perf_counter() - t0


def protect_group(
    images: torch.Tensor | list[torch.Tensor],
    config: CaprayConfig | None = None,
    *,
    identity: str = "group",
    models: Models | None = None,
    references: torch.Tensor | list[torch.Tensor] | None = None,
    evaluator_factory: Callable[..., Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    fixed: torch.Tensor | list[torch.Tensor] | None = None,
) -> GroupResult:
    """Protect one identity group.

    `images`: the group's photos in [-1, 1], (N, 3, H, W) or a list of (3, H, W) of any sizes — the
    perturbation is optimised at each photo's own resolution. `references`: clean photos for the
    surrogate (default: the group itself, which is what a user has; Anti-DreamBooth's protocol uses a
    separate set A). `models`: preloaded `Models` (a worker loads them once); loaded from the config
    otherwise. `evaluator_factory`: how λ candidates are scored (default: in-process, batched).
    `progress(done, total)` is called after every PGD step (the online endpoint reports it).
    `fixed`: the person's already-published protected photos (append mode, see `GroupAttack`): in
    CAP's style mean and consistency loss, never updated; only `images` come back.
    """
    config = config or CaprayConfig()
    photos = _as_list(images)
    _validate(photos)
    refs = _as_list(references) if references is not None else None
    if refs is not None:
        _validate(refs)
    fixed_photos = _as_list(fixed) if fixed is not None else []
    if fixed_photos:
        _validate(fixed_photos)
    models = models or load_models(config.model)
    start = time.perf_counter()
    attack = GroupAttack(models, config, identity, photos, refs, evaluator_factory, fixed_photos)
    attack.on_step = progress
    before = attack.consistency(attack.x) if attack.group_size >= 2 else 0.0
    attack.run()
    after = attack.consistency(attack.x) if attack.group_size >= 2 else 0.0
    if models.device.type == "cuda":
        torch.cuda.synchronize()
    attack.timings["total_s"] = time.perf_counter() - start
    protected = [img.detach().float().cpu() for img in attack.layout.unflatten(attack.x)]
    metrics = [image_metrics(clean, prot) for clean, prot in zip(photos, protected)]
    result = GroupResult(
        images=protected, steps=attack.steps, metrics=metrics, timings=attack.timings,
        method=config.attack.method, cap_enabled=attack.cap_on, consistency_before=before,
        consistency_after=after, surrogate_mode=attack.surrogate_mode(), notes=attack.notes,
        fixed_members=len(fixed_photos), ratio_max=config.cap.ratio_max,
    )
    if result.lambda_collapsed:
        counts = result.distinct_counts
        note = (f"λ stopped choosing: {collapsed_steps(counts)} of {len(counts)} searched steps had ≤ "
                f"{COLLAPSED_DISTINCT} distinct candidates of {config.cap.ratio_max + 1}, so the dynamic ratio only "
                "chose between the baseline and full consistency (see docs/engine.md#when-λ-stops-choosing)")
        result.notes.append(note)
        log.warning("identity %r: %s", identity, note)
    return result
