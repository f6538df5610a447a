"""CAP's dynamic ratio: choose λ ∈ {0..R} at each PGD step by the reconstruction loss after the update.

Sign convention: CAP pulls each photo's Gram matrices toward the group mean, so the consistency loss is
*descended* while the reconstruction loss is ascended: the update for ratio r is
x + α·sign(∇L_re − r·∇L_cons). (Algorithm 1 prints `L_re + r·L_cons` with an ascent step, which would
push the styles apart and contradicts the paper's text and Figure 2; the default follows the text, and
`cap.consistency_sign: ascend` runs Algorithm 1 as printed. The engine hands this module the signed
consistency gradient, so the searches below read the same under both.)

Two searches choose the same λ given the same randomness:

* `reference_search` is Algorithm 1 as written: for every r it recomputes the combined loss and its
  gradient, builds the candidate and scores it.
* `fast_search` uses that the gradient is linear in r: one backward per loss term gives every
  candidate's direction. Each photo's element sign(a − r·b) flips at most once as r grows, so
  identical candidates form contiguous runs of r; each run is scored once (its first r, which is also
  the one Algorithm 1's strict `>` keeps), and the scored candidates are batched on the batch
  dimension through a `CandidateEvaluator`.

Memory is set by the scoring chunk, not by N or by `cap.candidate_batch_size`: a `CandidateSet` is the
four group vectors (x, x0, ∇L_re, ∇L_cons) and a list of ratios, and a candidate's pixels are built on
demand, one photo (or one span of the flat group) at a time, only where they are needed: the evaluator
builds each scoring chunk's photos, the run detection compares consecutive candidates span by span, and
the winner's next x is built once at the end. So one call carries all of a step's scored candidates
(`cap.candidate_batch_size: 0`): fewer calls cost nothing in memory, and a sharded call ships the
four vectors once. `sign_step` is elementwise, so a span built alone has the
very values of the whole candidate: same λ, same pixels as building whole candidates.

Which randomness a candidate is scored on (`cap.score_draw`, built into a `CandidateScorer`) matters
more than anything else here. On the draw the gradients were taken on, the first-order gain
α·⟨∇L_re, sign(∇L_re − r∇L_cons)⟩ is largest at r = 0, so λ collapses to ≈ 0 and CAP silently becomes
its baseline ('gradient', kept for comparison). The default 'fresh' scores every candidate on new
draws of the same step, independent of the gradient's and shared by all candidates (common random
numbers: the comparison between candidates stays fair). 'independent' gives each candidate its own
draws, as a literal Algorithm 1 does; identical candidates then score differently, so nothing is
deduplicated. Both searches take the same scorer, so they choose the same λ under every option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw


@dataclass(frozen=True)
class CandidateSet:
    """λ candidates built on demand: candidate j = sign_step(x, x0, grad_re − ratios[j]·grad_cons, α, ε).

    Holds only the four flat group vectors (shared, never copied) and the ratios; `values(j, a, b)`
    builds elements a..b-1 of candidate j. (`grad_cons` None: the direction is `grad_re` itself, one
    candidate per ratio label, as the reference search scores its combined gradients.)
    """

    x: torch.Tensor
    x0: torch.Tensor
    grad_re: torch.Tensor
    grad_cons: torch.Tensor | None
    ratios: tuple[int, ...]
    alpha: float
    eps: float

    @property
    def m(self) -> int:
        return len(self.ratios)

    def values(self, j: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        span = slice(start, stop)
        direction = self.grad_re[span]
        if self.grad_cons is not None:
            direction = direction - self.ratios[j] * self.grad_cons[span]
        return sign_step(self.x[span], self.x0[span], direction, self.alpha, self.eps)

    def shard(self, start: int, stop: int) -> CandidateSet:
        return replace(self, ratios=self.ratios[start:stop])

    def to(self, device: Any) -> CandidateSet:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device)

        return replace(self, x=move(self.x), x0=move(self.x0), grad_re=move(self.grad_re),
                       grad_cons=move(self.grad_cons))


@dataclass(frozen=True)
class StackedCandidates:
    """Candidates given whole as flat rows (M, P) (benchmarks, tests): `CandidateSet`'s interface."""

    rows: torch.Tensor

    @property
    def m(self) -> int:
        return self.rows.shape[0]

    def values(self, j: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.rows[j, start:stop]

    def shard(self, start: int, stop: int) -> StackedCandidates:
        return StackedCandidates(self.rows[start:stop])

    def to(self, device: Any) -> StackedCandidates:
        return StackedCandidates(self.rows.detach().to(device))


Candidates = CandidateSet | StackedCandidates


def as_candidates(candidates: Candidates | torch.Tensor) -> Candidates:
    return StackedCandidates(candidates) if isinstance(candidates, torch.Tensor) else candidates


class CandidateEvaluator(Protocol):
    """Scores candidate groups: M candidates (a `CandidateSet`; whole rows (M, P) also do) → Σ over
    photos of L_re, shape (M,).

    All candidates of one call are scored under the same `draw` (N rows: common random numbers). An
    implementation may shard the M candidates across devices or actors; it must not change results.
    """

    def __call__(self, candidates: Candidates | torch.Tensor, draw: NoiseDraw) -> torch.Tensor: ...


@dataclass(frozen=True)
class EvaluationContext:
    """What scoring needs besides the candidates: the phase's UNet, prompt embedding and photo layout.

    An in-process evaluator closes over these; a remote one ships them once per PGD phase.
    """

    unet: Any
    cond: torch.Tensor
    layout: Any
    resolution: int


class InProcessEvaluator:
    """Scores candidates in this process, `image_batch_size` images per no-grad forward.

    The M candidates × N photos are one candidate-major list of images, cut into chunks of images
    (not of candidates), each chunk's photos built (at original resolution) and resized only when it is
    scored, so memory is set by the chunk, whatever N and M are. A robust-mode draw's transforms are
    applied to each photo before its resize (`GroupLayout.model_rows`): a candidate is scored as it
    reaches the attacker in that draw.
    `image_loss(images (B, 3, r, r), draw with B rows)` → per-image L_re, shape (B,).
    """

    def __init__(self, image_loss: Callable[[torch.Tensor, NoiseDraw], torch.Tensor], layout: Any,
                 resolution: int, image_batch_size: int):
        self.image_loss, self.layout, self.resolution = image_loss, layout, resolution
        self.image_batch_size = image_batch_size
        self.forward_passes = 0

    @torch.no_grad()
    def __call__(self, candidates: Candidates | torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        candidates = as_candidates(candidates)
        n = self.layout.n
        rows = candidates.m * n
        per_image = []
        for start in range(0, rows, self.image_batch_size):
            stop = min(start + self.image_batch_size, rows)
            images = self.layout.model_rows(candidates, start, stop, self.resolution, draw.augments)
            per_image.append(self.image_loss(images, draw.select(torch.arange(start, stop) % n)))
            self.forward_passes += 1
        return torch.cat(per_image).view(candidates.m, n).sum(dim=1)


@dataclass
class CandidateScorer:
    """How λ candidates are scored (`cap.score_draw`): which draws, and whether candidates share them.

    `draws_for(r)` gives the draws candidate r is scored on; its score is the mean over them. When
    `shared`, every candidate gets the same draws (common random numbers), so identical candidates
    have identical scores and the fast search may score each distinct one once, batched.
    """

    evaluator: CandidateEvaluator
    draws_for: Callable[[int], list[NoiseDraw]]
    shared: bool

    def __call__(self, candidates: CandidateSet) -> torch.Tensor:
        if self.shared:
            draws = self.draws_for(candidates.ratios[0])
            return torch.stack([self.evaluator(candidates, d) for d in draws]).mean(dim=0)
        return torch.cat([torch.stack([self.evaluator(candidates.shard(j, j + 1), d) for d in self.draws_for(r)])
                          .mean(dim=0) for j, r in enumerate(candidates.ratios)])


@dataclass
class SearchResult:
    ratio: int
    next_x: torch.Tensor
    best_loss: float
    distinct: int
    losses: dict[int, float] = field(default_factory=dict)  # scored r → L_re (first r of each run when shared)


SPAN = 1 << 22  # elements of the flat group compared at a time when looking for runs of equal candidates


def repeats(candidates: CandidateSet, span: int | None = None) -> list[bool]:
    """repeats[j]: candidate j equals candidate j − 1 element for element (never for j = 0).

    Compared span by span of the flat group, so no whole candidate is ever built; a pair already known
    to differ is not looked at again, and the pass ends as soon as every pair is known to differ.
    """
    span = span or SPAN
    same = [j > 0 for j in range(candidates.m)]
    size = candidates.x.numel()
    for a in range(0, size, span):
        live = [j for j in range(1, candidates.m) if same[j]]
        if not live:
            break
        b = min(a + span, size)
        flags, last_j, last = [], -1, None
        for j in live:
            prev = last if last_j == j - 1 else candidates.values(j - 1, a, b)
            last_j, last = j, candidates.values(j, a, b)
            flags.append((last == prev).all())  # torch.equal's answer, without a device sync per pair
        for j, equal in zip(live, torch.stack(flags).tolist()):
            same[j] = equal
    return same


def fast_search(
    x: torch.Tensor,
    x0: torch.Tensor,
    grad_re: torch.Tensor,
    grad_cons: torch.Tensor,
    ratios: range,
    alpha: float,
    eps: float,
    scorer: CandidateScorer,
    batch_size: int,
) -> SearchResult:
    """Exact λ search with one backward per loss term and batched candidate scoring.

    With shared draws each run of identical candidates is scored once; with per-candidate draws
    (`independent`) every r is scored, because identical candidates then get different scores.
    Candidates stay lazy (`CandidateSet`): only ratios travel, the evaluator builds each chunk's photos,
    so all of them go in one evaluator call by default (`batch_size` 0) and memory is still the chunk's.
    """
    every = CandidateSet(x, x0, grad_re, grad_cons, tuple(ratios), alpha, eps)
    repeat = repeats(every)
    scored = [j for j in range(every.m) if not (repeat[j] and scorer.shared)]
    best_j, best_ratio, best_loss = None, 0, 0.0
    losses: dict[int, float] = {}
    per_call = batch_size or len(scored) or 1  # 0: every scored candidate in one evaluator call
    for i in range(0, len(scored), per_call):
        batch = scored[i: i + per_call]
        scores = scorer(replace(every, ratios=tuple(every.ratios[j] for j in batch))).tolist()
        for j, score in zip(batch, scores):
            r = every.ratios[j]
            losses[r] = score
            if score > best_loss:  # strict: ties keep the smaller r, as Algorithm 1 does
                best_j, best_ratio, best_loss = j, r, score
    if best_j is None:  # every score ≤ 0: Algorithm 1 keeps λ = 0
        next_x = sign_step(x, x0, grad_re, alpha, eps)
    else:  # the winner, built once
        next_x = every.values(best_j)
    return SearchResult(best_ratio, next_x, best_loss, repeat.count(False), losses)


def reference_search(
    x: torch.Tensor,
    x0: torch.Tensor,
    combined_grad: Callable[[torch.Tensor, float], torch.Tensor],
    ratios: range,
    alpha: float,
    eps: float,
    scorer: CandidateScorer,
) -> SearchResult:
    """Algorithm 1, lines 8–18, literally: a fresh forward/backward of L_re − r·L_cons for every r."""
    best_ratio, best_loss, distinct = 0, 0.0, 0
    losses: dict[int, float] = {}
    previous: torch.Tensor | None = None
    for r in ratios:
        grad = combined_grad(x, float(r))
        cand = sign_step(x, x0, grad, alpha, eps)
        distinct += previous is None or not torch.equal(cand, previous)
        previous = cand
        score = float(scorer(CandidateSet(x, x0, grad, None, (r,), alpha, eps))[0])
        losses[r] = score
        if score > best_loss:
            best_ratio, best_loss = r, score
    next_x = sign_step(x, x0, combined_grad(x, float(best_ratio)), alpha, eps)  # lines 17–18
    return SearchResult(best_ratio, next_x, best_loss, distinct, losses)


def make_evaluator(image_loss: Callable[[torch.Tensor, NoiseDraw], torch.Tensor], context: EvaluationContext,
                   image_batch_size: int, factory: Callable[..., Any] | None = None) -> CandidateEvaluator:
    """The default in-process evaluator, or whatever `factory` builds (e.g. sharded over actors)."""
    if factory is not None:
        return factory(loss_fn=image_loss, n_images=context.layout.n, batch_size=image_batch_size, context=context)
    return InProcessEvaluator(image_loss, context.layout, context.resolution, image_batch_size)
