"""The CAP paper's Table 1 protocol: protect each identity with Anti-DB (FSMG, ASPL) and SimAC, each
with and without CAP, then let the attacker (DreamBooth) learn from every set and score it.

With the datasets and real weights (``--data CelebA-HQ-style root --model stabilityai/stable-diffusion-2-1-base
--preset paper`` on a GPU) this is the paper's protocol: ~50 identities × 4 photos at 512², ε=0.05,
α=0.005, DreamBooth 1000 steps / batch 2 / lr 5e-7, 16 images per prompt. Without them it runs the
same code on the tiny random model with the smoke preset, on the shared sample faces (or on
augmentations of skimage's astronaut) — which checks the plumbing, not the paper's numbers.

As in the paper, "Anti-DB" is the mean of the FSMG and ASPL rows. Data layout: ``ROOT/<identity>/``
holding the photos to protect, or ``ROOT/<identity>/set_B/`` (Anti-DreamBooth's layout; set_B is the
set that gets protected and attacked, and a clean ``set_A`` next to it is what the surrogate learns from).
Prints the table and ends with ``RESULT paper_table identities=<n> backends=<names>``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_FACES = ROOT.parent / "shared" / "data" / "faces"
PAPER_CELEBA = {  # CAP Table 1, CelebA-HQ column (FDFR, ISM, SER-FIQ, CLIP-IQA)
    "Anti-DB": (0.1019, 0.4243, 0.4980, 0.6823), "Anti-DB+CAP": (0.1230, 0.4056, 0.4897, 0.6746),
    "SimAC": (0.7160, 0.1077, 0.2142, 0.4609), "SimAC+CAP": (0.7446, 0.0903, 0.2139, 0.4525),
}
TABLE_METRICS = ("FDFR", "ISM", "SER-FIQ", "BRISQUE", "CLIP-IQA")


def center_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """The paper's preprocessing: centre crop to a square, resize to size×size."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return np.array(Image.fromarray(rgb[top:top + s, left:left + s]).resize((size, size), Image.LANCZOS))


def collect(data: Path | None, size: int, limit: int | None) -> dict[str, list[tuple[str, np.ndarray]]]:
    """identity → [(stem, photo)] from ROOT/<id>/[set_B/]; default: the shared faces or the astronaut."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    if data is None and SHARED_FACES.is_dir():
        data = SHARED_FACES
    if data is None:
        from skimage import data as skdata

        base = skdata.astronaut()
        rng = np.random.default_rng(0)
        variants = [base, base[:, ::-1], np.clip(base * 0.9 + 10, 0, 255),
                    np.clip(base + rng.normal(0, 4, base.shape), 0, 255)]
        return {"astronaut": [(f"astronaut_{i}", center_square(v.astype(np.uint8), size))
                              for i, v in enumerate(variants)]}
    for ident in sorted(p for p in data.iterdir() if p.is_dir()):
        folder = ident / "set_B" if (ident / "set_B").is_dir() else ident
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if photos:
            groups[ident.name] = [(p.stem, center_square(np.asarray(Image.open(p).convert("RGB")), size))
                                  for p in photos]
        if limit and len(groups) >= limit:
            break
    return groups


def references(data: Path | None, ident: str, size: int) -> list[np.ndarray] | None:
    """Anti-DreamBooth's protocol: the surrogate learns from a separate clean set_A when there is one."""
    folder = (data or SHARED_FACES) / ident / "set_A"
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    return [center_square(np.asarray(Image.open(p).convert("RGB")), size) for p in files] or None


def protect_all(groups, out: Path, cfg, methods: list[str], refs: dict[str, list[np.ndarray] | None]) -> list[Path]:
    """One output folder per (method, CAP on/off), in `capray protect`'s layout with a run.json."""
    import torch

    from capray import load_models, protect_group
    from capray.attack.metrics import from_uint8, to_uint8

    models = load_models(cfg.model)
    folders = []
    for method in methods:
        for cap in (False, True):
            run_cfg = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"method": method}),
                                             "cap": cfg.cap.model_copy(update={"enabled": cap})})
            folder = out / f"{method}{'-cap' if cap else ''}"
            for ident, photos in groups.items():
                t0 = time.perf_counter()
                ref = [from_uint8(r) for r in refs[ident]] if refs.get(ident) else None
                result = protect_group([from_uint8(p) for _, p in photos], run_cfg, identity=ident, models=models,
                                       references=ref)
                (folder / ident).mkdir(parents=True, exist_ok=True)
                for (stem, _), img in zip(photos, result.images):
                    Image.fromarray(to_uint8(img)).save(folder / ident / f"{stem}.png")
                print(f"protected {ident:<12} {method:<6} cap={'on ' if cap else 'off'} "
                      f"{time.perf_counter() - t0:6.1f} s", flush=True)
            (folder / "run.json").write_text(json.dumps({"config": run_cfg.model_dump(mode="json")}, indent=1))
            folders.append(folder)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return folders


def table_rows(results: list[dict]) -> dict[str, dict[str, float | None]]:
    """Paper rows: Anti-DB = mean(FSMG, ASPL) per metric; SimAC as is; each with and without CAP."""
    from capray.evaluate.report import aggregate

    agg = aggregate(results)
    by_label = {row["label"]: {m: row["metrics"].get(m, {}).get("mean") for m in TABLE_METRICS} for row in agg.values()}

    def mean_of(labels):
        out = {}
        for m in TABLE_METRICS:
            vals = [by_label[lb][m] for lb in labels if lb in by_label and by_label[lb][m] is not None]
            out[m] = float(np.mean(vals)) if vals else None
        return out

    rows = {"clean": by_label.get("clean", {})}
    for name, labels in (("Anti-DB", ["FSMG", "ASPL"]), ("SimAC", ["SimAC"])):
        if any(lb in by_label for lb in labels):
            rows[name] = mean_of(labels)
        if any(f"{lb}+CAP" in by_label for lb in labels):
            rows[f"{name}+CAP"] = mean_of([f"{lb}+CAP" for lb in labels])
    return rows


def short_name(backend: str) -> str:
    """'brisque (LIVE SVM)' → 'brisque-LIVE-SVM'; any 'unavailable: why' → 'unavailable'."""
    return "unavailable" if backend.startswith("unavailable") else re.sub(r"[^\w.]+", "-", backend).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="ROOT/<identity>/[set_B/]<photos> (default: shared sample faces)")
    parser.add_argument("--model", default="tiny", help="SD hub id / local dir, or 'tiny'")
    parser.add_argument("--preset", choices=["smoke", "paper"], help="default: paper for a real model, smoke for tiny")
    parser.add_argument("--methods", default="fsmg,aspl,simac")
    parser.add_argument("--identities", type=int, help="use at most this many identities")
    parser.add_argument("--size", type=int, help="photo side after centre crop (default 512 paper, 128 smoke)")
    parser.add_argument("--out", type=Path, default=Path("out/paper_table"))
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    from capray.config import load_config
    from capray.evaluate.pipeline import evaluate

    preset = args.preset or ("smoke" if args.model == "tiny" else "paper")
    cfg = load_config(preset=preset, overrides={"model": {"sd": args.model}})
    size = args.size or (512 if preset == "paper" else 128)
    groups = collect(args.data, size, args.identities)
    if not groups:
        print("no identities found", file=sys.stderr)
        return 2
    clean = args.out / "clean"
    for ident, photos in groups.items():
        (clean / ident).mkdir(parents=True, exist_ok=True)
        for stem, rgb in photos:
            Image.fromarray(rgb).save(clean / ident / f"{stem}.png")
    print(f"paper_table: {len(groups)} identities, model={args.model}, preset={preset}, {size}px", flush=True)
    t0 = time.perf_counter()
    refs = {ident: references(args.data, ident, size) for ident in groups}
    print(f"surrogate references (set_A): {sum(r is not None for r in refs.values())}/{len(refs)} identities",
          flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    folders = protect_all(groups, args.out / "protected", cfg, methods, refs)
    t_protect = time.perf_counter() - t0
    result = evaluate(clean, folders, args.out / "eval", cfg, use_ray=not args.no_ray)
    rows = table_rows(result["identities"])
    from capray.evaluate.report import backend_names

    backends = backend_names(result["identities"])
    print(f"\nTable 1 protocol ({len(groups)} identities; protect {t_protect:.0f} s, "
          f"attack+metrics {result['meta']['seconds']:.0f} s)")
    print(f"{'method':<13}" + "".join(f"{m + (' ↑' if m in ('FDFR', 'BRISQUE') else ' ↓'):>11}" for m in TABLE_METRICS)
          + "   paper CelebA-HQ (FDFR, ISM, SER-FIQ, CLIP-IQA)")
    for name, vals in rows.items():
        cells = "".join(f"{('n/a' if vals.get(m) is None else f'{vals[m]:.4f}'):>11}" for m in TABLE_METRICS)
        paper = PAPER_CELEBA.get(name)
        print(f"{name:<13}{cells}   {'' if paper is None else ', '.join(f'{v:.4f}' for v in paper)}")
    print("backends: " + "; ".join(f"{m}={b}" for m, b in backends.items()))
    print(f"report: {result['report']}")
    names = ",".join(f"{m}:{short_name(b)}" for m, b in backends.items())
    print(f"RESULT paper_table identities={len(groups)} backends={names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
