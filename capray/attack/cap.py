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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw


class CandidateEvaluator(Protocol):
    """Scores candidate groups: flat candidates (M, P) → Σ over photos of L_re, shape (M,).

    All candidates of one call are scored under the same `draw` (common random numbers). An
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
    """Scores candidates in this process, `batch_size` candidates (× N photos) per forward pass."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, NoiseDraw], torch.Tensor], n_images: int, batch_size: int):
        self.loss_fn, self.n_images, self.batch_size = loss_fn, n_images, batch_size
        self.forward_passes = 0

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        scores = []
        for chunk in candidates.split(self.batch_size):
            per_image = self.loss_fn(chunk, draw.repeat(chunk.shape[0]))
            scores.append(per_image.view(chunk.shape[0], self.n_images).sum(dim=1))
            self.forward_passes += 1
        return torch.cat(scores)


@dataclass
class SearchResult:
    ratio: int
    next_x: torch.Tensor
    best_loss: float
    distinct: int
    losses: dict[int, float] = field(default_factory=dict)  # first r of each distinct run → L_re


def fast_search(
    x: torch.Tensor,
    x0: torch.Tensor,
    grad_re: torch.Tensor,
    grad_cons: torch.Tensor,
    ratios: range,
    alpha: float,
    eps: float,
    evaluator: CandidateEvaluator,
    draw: NoiseDraw,
    batch_size: int,
) -> SearchResult:
    """Exact λ search with one backward per loss term, deduplicated and batched candidate scoring."""
    best_ratio, best_loss, best_x = 0, 0.0, None
    losses: dict[int, float] = {}
    pending_r: list[int] = []
    pending_x: list[torch.Tensor] = []
    previous: torch.Tensor | None = None

    def flush() -> None:
        nonlocal best_ratio, best_loss, best_x
        scores = evaluator(torch.stack(pending_x), draw).tolist()
        for r, cand, score in zip(pending_r, pending_x, scores):
            losses[r] = score
            if score > best_loss:  # strict: ties keep the smaller r, as Algorithm 1 does
                best_ratio, best_loss, best_x = r, score, cand
        pending_r.clear()
        pending_x.clear()

    for r in ratios:
        cand = sign_step(x, x0, grad_re - r * grad_cons, alpha, eps)
        if previous is not None and torch.equal(cand, previous):
            continue
        previous = cand
        pending_r.append(r)
        pending_x.append(cand)
        if len(pending_x) == batch_size:
            flush()
    if pending_x:
        flush()
    if best_x is None:  # every score ≤ 0: Algorithm 1 keeps λ = 0
        best_x = sign_step(x, x0, grad_re, alpha, eps)
    return SearchResult(best_ratio, best_x, best_loss, len(losses), losses)


def reference_search(
    x: torch.Tensor,
    x0: torch.Tensor,
    combined_grad: Callable[[torch.Tensor, float], torch.Tensor],
    ratios: range,
    alpha: float,
    eps: float,
    evaluator: CandidateEvaluator,
    draw: NoiseDraw,
) -> SearchResult:
    """Algorithm 1, lines 8–18, literally: a fresh forward/backward of L_re − r·L_cons for every r."""
    best_ratio, best_loss, distinct = 0, 0.0, 0
    losses: dict[int, float] = {}
    previous: torch.Tensor | None = None
    for r in ratios:
        cand = sign_step(x, x0, combined_grad(x, float(r)), alpha, eps)
        distinct += previous is None or not torch.equal(cand, previous)
        previous = cand
        score = float(evaluator(cand.unsqueeze(0), draw)[0])
        losses[r] = score
        if score > best_loss:
            best_ratio, best_loss = r, score
    next_x = sign_step(x, x0, combined_grad(x, float(best_ratio)), alpha, eps)  # lines 17–18
    return SearchResult(best_ratio, next_x, best_loss, distinct, losses)


def make_evaluator(loss_fn: Callable[[torch.Tensor, NoiseDraw], torch.Tensor], n_images: int,
                   batch_size: int, factory: Callable[..., Any] | None = None,
                   context: EvaluationContext | None = None) -> CandidateEvaluator:
    """The default in-process batched evaluator, or whatever `factory` builds (e.g. sharded over actors)."""
    if factory is not None:
        return factory(loss_fn=loss_fn, n_images=n_images, batch_size=batch_size, context=context)
    return InProcessEvaluator(loss_fn, n_images, batch_size)
