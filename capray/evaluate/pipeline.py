"""`evaluate(...)`: plan the photo sets, run the identities (Ray), write results.json and the report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from os import PathLike
from typing import Any

from capray.config import CaprayConfig
from capray.evaluate.files import EvalFiles
from capray.evaluate.layout import Source, check_output, list_identities, list_photos, plan_sources
from capray.evaluate.report import render
from capray.evaluate.runner import IdentityTask, run_identities
from capray.evaluate.transforms import Transform, parse_transforms
from capray.io.naming import identity_problem
from capray.io.storage import join, normalize_uri, redacted_config


def evaluate(clean: str | PathLike, protected: list[str | PathLike], out: str | PathLike, cfg: CaprayConfig, *,
             use_ray: bool = True, identities: list[str] | None = None, address: str | None = None,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Attack clean and protected photos of every identity, score, and write OUT/report.html + summary.md.

    Every location is a local path or an fsspec URI (`s3://…`, opened with `batch.storage_options`).
    """
    files = EvalFiles.from_config(cfg)
    clean, out = normalize_uri(str(clean)), normalize_uri(str(out))
    protected = [normalize_uri(str(p)) for p in protected]
    for folder in [clean, *protected]:
        if not files.is_dir(folder):
            raise FileNotFoundError(f"no such folder: {folder}")
    check_output(out, [clean, *protected])
    transforms = parse_transforms(cfg.evaluate.transforms)
    unavailable = {t: t.unavailable(cfg.evaluate) for t in transforms}
    sources = plan_sources(clean, protected, transforms, files, unavailable)
    for t, reason in unavailable.items():
        if reason:
            progress(f"purification {t.spec} unavailable (not trained on): {reason}")
    if identities:  # named ones are looked up directly, without listing the whole library
        wanted = sorted(i for i in set(identities) if identity_problem(i) is None)
    else:
        wanted = list_identities(clean, files)
    names = [i for i in wanted if list_photos(join(clean, i), files)]
    if not names:
        raise ValueError(f"no identities with photos under {clean} (expected {clean}/<identity>/<photos>)")
    tasks = [IdentityTask(i, sources, out) for i in names]
    started = time.perf_counter()
    results = run_identities(tasks, cfg, use_ray=use_ray, address=address, progress=progress)
    meta = {
        "model": cfg.model.sd, "resolution": cfg.model.resolution, "seed": cfg.seed,
        "train_steps": cfg.evaluate.train_steps, "learning_rate": cfg.evaluate.learning_rate,
        "batch_size": cfg.evaluate.batch_size, "lora": cfg.evaluate.lora, "prompts": cfg.evaluate.prompts,
        "images_per_prompt": cfg.evaluate.images_per_prompt, "sample_steps": cfg.evaluate.sample_steps,
        "guidance_scale": cfg.evaluate.guidance_scale,
        "sources": [source_meta(s) for s in sources],
        "purifications": purification_meta(transforms, unavailable, results),
        "seconds": round(time.perf_counter() - started, 3),
        "config": redacted_config(cfg),
    }
    files.write(join(out, "results.json"),
                json.dumps({"meta": meta, "identities": results}, indent=1, default=str).encode("utf-8"))
    html_path, md_path = render(out, results, meta, files)
    progress(f"report: {html_path}  summary: {md_path}")
    return {"meta": meta, "identities": results, "report": str(html_path), "summary": str(md_path)}


def source_meta(source: Source) -> dict[str, Any]:
    """A photo set as results.json lists it: the purification by label and spec (its parameters are in
    meta["purifications"])."""
    t = source.transform
    return {**asdict(source), "transform": t.label if t else None, "purification": t.spec if t else None}


def purification_meta(transforms: list[Transform], unavailable: dict[Transform, str | None],
                      results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each purification with its parameters and, where it could not run, why: known before the run
    (not configured) or found by the identity tasks (the weights did not load)."""
    found = {e["purification"]: e.get("reason") for r in results for e in r.get("sources", {}).values()
             if e.get("status") == "unavailable" and e.get("purification")}
    return [{**t.describe(), "unavailable": unavailable[t] or found.get(t.spec)} for t in transforms]
