"""Evaluate every identity, one Ray task each (a GPU per task when the cluster has GPUs).

A task loads the diffusion model once, then for each source (clean, each protected set, each
purified variant of it) fine-tunes DreamBooth, generates, saves the samples under
`OUT/generated/<identity>/<source>/` and scores them. All sources of an identity use the same
training noise and sampling seeds (common random numbers), so differences between rows come from
the photos, not from luck. A failing source or identity is recorded and the rest go on; a
purification that cannot run here (its model is missing) is recorded as unavailable and not trained.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from capray.config import CaprayConfig
from capray.evaluate.files import EvalFiles
from capray.evaluate.layout import Source, load_photo_set, slugify
from capray.evaluate.purification import Unavailable
from capray.evaluate.visibility import lpips_or_reason, visibility
from capray.io.images import encode_png
from capray.io.storage import join


@dataclass
class IdentityTask:
    identity: str
    sources: list[Source]
    out: str


def source_visibility(clean: dict[str, np.ndarray], protected: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean L∞/PSNR/SSIM (and LPIPS when available) over photos present in both sets, matched by stem."""
    pairs = [(clean[s], protected[s]) for s in sorted(protected) if s in clean and clean[s].shape == protected[s].shape]
    if not pairs:
        return {"n": 0, "reason": "no protected photo matches a clean photo (by file stem and size)"}
    rows = [visibility(c, p) for c, p in pairs]
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("linf_255", "psnr", "ssim"):
        out[key] = float(np.mean([r[key] for r in rows]))
    model, reason = lpips_or_reason()
    out["lpips"] = float(np.mean([model.score(c, p) for c, p in pairs])) if model else None
    out["lpips_reason"] = reason
    return out


def evaluate_identity(task: IdentityTask, cfg: CaprayConfig) -> dict[str, Any]:
    """Everything for one identity; returns a JSON-friendly dict (errors recorded, never raised)."""
    from capray.evaluate.attacker import generate, personalize
    from capray.evaluate.metrics import MetricSuite

    started = time.perf_counter()
    result: dict[str, Any] = {"identity": task.identity, "sources": {}, "errors": [], "notes": []}
    files = EvalFiles.from_config(cfg)
    try:
        clean_src = next(s for s in task.sources if not s.protected)
        clean, errs = load_photo_set(clean_src, task.identity, files)
        result["errors"] += [f"clean {e}" for e in errs]
        if not clean:
            raise ValueError("no readable clean photos")
        suite = MetricSuite(cfg.evaluate)
        result["notes"] += suite.notes
        result["backends"] = suite.backends()
        reference, n_ref = suite.reference_embedding(list(clean.values()))
        result["reference_faces"] = n_ref
        result["clean_photos"] = sorted(clean)

        from capray.evaluate.attacker import attacker_surrogate_config
        from capray.evaluate.purifiers import Purifiers
        from capray.models.class_images import ensure_class_images
        from capray.models.sd import load_diffusion

        parts = load_diffusion(cfg.model)
        class_images = ensure_class_images(parts, attacker_surrogate_config(cfg), cfg.model.resolution)
        purifiers = Purifiers(cfg, parts.device, parts.dtype)
        seed_parts = (cfg.seed, task.identity, "attacker")
        for source in task.sources:
            entry: dict[str, Any] = {"label": source.label, "group": source.group}
            if source.transform is not None:
                entry["purification"] = source.transform.spec
            result["sources"][source.key] = entry
            if source.unavailable:  # known before any work: no photos read, no training
                entry.update(status="unavailable", reason=source.unavailable, seconds=0.0)
                continue
            t0 = time.perf_counter()
            try:
                if source.protected:
                    photos, errs = load_photo_set(source, task.identity, files)
                    entry["errors"] = errs
                    if not photos:
                        raise ValueError(f"no readable photos in {source.root}/{task.identity}")
                    entry["visibility"] = source_visibility(clean, photos)
                    if source.transform is not None:
                        photos = purifiers.apply(source.transform, photos)
                else:
                    photos = clean
                entry["photos"] = sorted(photos)
                surrogate = personalize(parts, cfg, list(photos.values()), seed_parts, class_images)
                samples = generate(parts, surrogate, cfg, seed_parts)
                del surrogate
                paths, images = [], []
                for p_idx, (prompt, imgs) in enumerate(samples.items()):
                    for i, rgb in enumerate(imgs):
                        rel = f"generated/{task.identity}/{source.key}/{p_idx}-{slugify(prompt)}/{i:03d}.png"
                        files.write(join(task.out, rel), encode_png(rgb))
                        paths.append(rel)
                        images.append(rgb)
                entry["samples"] = paths
                entry["metrics"] = suite.score(images, reference, seed=int(cfg.seed))
                entry["status"] = "ok"
            except Unavailable as exc:  # the purifier's weights did not load: reported, never approximated
                entry.update(status="unavailable", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - keep going with the other sources
                entry["status"] = "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc(limit=5)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            _free_cuda()
        purifiers.close()
        _free_cuda()
        done = all(e.get("status") in ("ok", "unavailable") for e in result["sources"].values())
        result["status"] = "ok" if done else "partial"
    except Exception as exc:  # noqa: BLE001
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=5)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_identities(tasks: list[IdentityTask], cfg: CaprayConfig, *, use_ray: bool = True,
                   address: str | None = None, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every identity (Ray tasks, or in-process with use_ray=False) and report progress as they finish."""
    results: list[dict[str, Any]] = []
    total = len(tasks)
    if not use_ray:
        for i, task in enumerate(tasks, 1):
            res = evaluate_identity(task, cfg)
            results.append(res)
            progress(f"[{i}/{total}] {task.identity}: {res['status']} ({res['seconds']:.1f} s)")
        return results
    import ray

    from capray.cluster import connect_ray

    connect_ray(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    remote = ray.remote(evaluate_identity).options(num_cpus=cfg.evaluate.cpus_per_identity, num_gpus=gpus,
                                                   max_retries=0)
    cfg_ref = ray.put(cfg)
    pending = {remote.remote(task, cfg_ref): task for task in tasks}
    progress(f"evaluating {total} identities on Ray ({'1 GPU' if gpus else 'CPU'} per task, "
             f"{len(tasks[0].sources) if tasks else 0} photo sets each)")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        try:
            res = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - a dead worker fails one identity, not the run
            res = {"identity": task.identity, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "sources": {}, "errors": [], "notes": [], "seconds": 0.0}
        results.append(res)
        progress(f"[{len(results)}/{total}] {task.identity}: {res['status']} ({res['seconds']:.1f} s)")
    return sorted(results, key=lambda r: r["identity"])
