"""CAP's dynamic ratio: choose λ ∈ {0..R} at each PGD step by the reconstruction loss after the update.

Sign convention: CAP pulls each photo's Gram matrices toward the group mean, so the consistency loss is
*descended* while the reconstruction loss is ascended: the update for ratio r is
x + α·sign(∇L_re − r·∇L_cons). (Algorithm 1 prints `L_re + r·L_cons` with an ascent step, which would
push the styles apart and contradicts the paper's text and Figure 2; we follow the text.)

Two searches choose the same λ given the same randomness:

* `reference_search` is Algorithm 1 as written: for every r it recomputes the combined loss and its
  gradient, builds the candidate and scores it.
* `fast_search` uses that the gradient is linear in r: one backward per loss term gives every
  candidate's direction. Each photo's element sign(a − r·b) flips at most once as r grows, so
  identical candidates form contiguous runs of r; each run is scored once (its first r, which is also
  the one Algorithm 1's strict `>` keeps), and the scored candidates are batched on the batch
  dimension through a `CandidateEvaluator`.

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

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw


class CandidateEvaluator(Protocol):
    """Scores candidate groups: flat candidates (M, P) → Σ over photos of L_re, shape (M,).

    All candidates of one call are scored under the same `draw` (N rows: common random numbers). An
    implementation may shard the M candidates across devices or actors; it must not change results.
    """

    def __call__(self, candidates: torch.Tensor, draw: NoiseDraw) -> torch.Tensor: ...


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
    (not of candidates), so a forward's memory is set by the chunk, whatever N and M are.
    `image_loss(images (B, 3, r, r), draw with B rows)` → per-image L_re, shape (B,).
    """

    def __init__(self, image_loss: Callable[[torch.Tensor, NoiseDraw], torch.Tensor], layout: Any,
                 resolution: int, image_batch_size: int):
        self.image_loss, self.layout, self.resolution = image_loss, layout, resolution
        self.image_batch_size = image_batch_size
        self.forward_passes = 0

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        n = self.layout.n
        rows = candidates.shape[0] * n
        per_image = []
        for start in range(0, rows, self.image_batch_size):
            stop = min(start + self.image_batch_size, rows)
            images = self.layout.model_rows(candidates, start, stop, self.resolution)
            per_image.append(self.image_loss(images, draw.select(torch.arange(start, stop) % n)))
            self.forward_passes += 1
        return torch.cat(per_image).view(candidates.shape[0], n).sum(dim=1)


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

    def __call__(self, candidates: torch.Tensor, ratios: list[int]) -> torch.Tensor:
        if self.shared:
            draws = self.draws_for(ratios[0])
            return torch.stack([self.evaluator(candidates, d) for d in draws]).mean(dim=0)
        return torch.cat([torch.stack([self.evaluator(c.unsqueeze(0), d) for d in self.draws_for(r)]).mean(dim=0)
                          for c, r in zip(candidates, ratios)])


@dataclass
class SearchResult:
    ratio: int
    next_x: torch.Tensor
    best_loss: float
    distinct: int
    losses: dict[int, float] = field(default_factory=dict)  # scored r → L_re (first r of each run when shared)


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
    """
    best_ratio, best_loss, best_x = 0, 0.0, None
    losses: dict[int, float] = {}
    pending_r: list[int] = []
    pending_x: list[torch.Tensor] = []
    previous: torch.Tensor | None = None
    distinct = 0

    def flush() -> None:
        nonlocal best_ratio, best_loss, best_x
        scores = scorer(torch.stack(pending_x), list(pending_r)).tolist()
        for r, cand, score in zip(pending_r, pending_x, scores):
            losses[r] = score
            if score > best_loss:  # strict: ties keep the smaller r, as Algorithm 1 does
                best_ratio, best_loss, best_x = r, score, cand
        pending_r.clear()
        pending_x.clear()

    for r in ratios:
        cand = sign_step(x, x0, grad_re - r * grad_cons, alpha, eps)
        repeat = previous is not None and torch.equal(cand, previous)
        distinct += not repeat
        previous = cand
        if repeat and scorer.shared:
            continue
        pending_r.append(r)
        pending_x.append(cand)
        if len(pending_x) == batch_size:
            flush()
    if pending_x:
        flush()
    if best_x is None:  # every score ≤ 0: Algorithm 1 keeps λ = 0
        best_x = sign_step(x, x0, grad_re, alpha, eps)
    return SearchResult(best_ratio, best_x, best_loss, distinct, losses)


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
        cand = sign_step(x, x0, combined_grad(x, float(r)), alpha, eps)
        distinct += previous is None or not torch.equal(cand, previous)
        previous = cand
        score = float(scorer(cand.unsqueeze(0), [r])[0])
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
