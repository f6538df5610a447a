"""`evaluate(...)`: plan the photo sets, run the identities (Ray), write results.json and the report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from capray.config import CaprayConfig
from capray.evaluate.layout import check_output, list_identities, list_photos, plan_sources
from capray.evaluate.report import render
from capray.evaluate.runner import IdentityTask, run_identities
from capray.evaluate.transforms import parse_transform


def evaluate(clean: str | Path, protected: list[str | Path], out: str | Path, cfg: CaprayConfig, *,
             use_ray: bool = True, identities: list[str] | None = None, address: str | None = None,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Attack clean and protected photos of every identity, score, and write OUT/report.html + summary.md."""
    clean, out = Path(clean), Path(out)
    protected = [Path(p) for p in protected]
    for folder in [clean, *protected]:
        if not folder.is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")
    check_output(out, [clean, *protected])
    transforms = [parse_transform(t) for t in cfg.evaluate.transforms]
    sources = plan_sources(clean, protected, transforms)
    names = [i for i in list_identities(clean) if list_photos(clean / i)]
    if identities:
        names = [i for i in names if i in set(identities)]
    if not names:
        raise ValueError(f"no identities with photos under {clean} (expected {clean}/<identity>/<photos>)")
    out.mkdir(parents=True, exist_ok=True)
    tasks = [IdentityTask(i, sources, str(out)) for i in names]
    started = time.perf_counter()
    results = run_identities(tasks, cfg, use_ray=use_ray, address=address, progress=progress)
    meta = {
        "model": cfg.model.sd, "resolution": cfg.model.resolution, "seed": cfg.seed,
        "train_steps": cfg.evaluate.train_steps, "learning_rate": cfg.evaluate.learning_rate,
        "batch_size": cfg.evaluate.batch_size, "lora": cfg.evaluate.lora, "prompts": cfg.evaluate.prompts,
        "images_per_prompt": cfg.evaluate.images_per_prompt, "sample_steps": cfg.evaluate.sample_steps,
        "guidance_scale": cfg.evaluate.guidance_scale,
        "sources": [{**asdict(s), "transform": s.transform.label if s.transform else None} for s in sources],
        "seconds": round(time.perf_counter() - started, 3),
        "config": json.loads(cfg.model_dump_json()),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "identities": results}, indent=1, default=str))
    html_path, md_path = render(out, results, meta)
    progress(f"report: {html_path}  summary: {md_path}")
    return {"meta": meta, "identities": results, "report": str(html_path), "summary": str(md_path)}
