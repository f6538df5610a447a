"""The report people look at: `report.html` (inline CSS, image strips as PNGs next to it) and
`summary.md`, both built from `results.json`.

One table per protection method (clean / baseline / baseline + CAP), every metric header naming its
backend; the purifications, side by side with the sets they purify (`report_purify`); then per
identity: the clean photos, each protected set, its perturbation amplified
(clip(0.5 + (protected − clean)·k)), and samples the attacker generated.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Collection
from os import PathLike
from typing import Any

import numpy as np
from PIL import Image

from capray.evaluate import report_purify
from capray.evaluate.files import EvalFiles
from capray.evaluate.layout import Source, load_photo_set, slugify
from capray.evaluate.metrics import DIRECTION, METRICS
from capray.evaluate.report_cells import arrow, fmt, metric_header, short_backend
from capray.io.storage import join, normalize_uri
from capray.models.pixels import unit_to_uint8

THUMB = 128
AMPLIFY = 10.0
MAX_SAMPLES_SHOWN = 8
PAPER_BACKENDS = {"FDFR": "RetinaFace-R50", "ISM": "ArcFace", "SER-FIQ": "SER-FIQ", "BRISQUE": "brisque",
                  "CLIP-IQA": "CLIP-IQA"}
VIS_COLUMNS = (("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("linf_255", "L∞ /255", "{:.1f}"),
               ("lpips", "LPIPS", "{:.4f}"))


# -- aggregation -------------------------------------------------------------------------------

def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per source: label, group, mean of each metric over identities (None where none had a value), and
    the reasons a purification could not run (`unavailable`: not a failure, and never a number)."""
    table: dict[str, dict[str, Any]] = {}
    for res in results:
        for key, entry in res.get("sources", {}).items():
            row = table.setdefault(key, {"label": entry["label"], "group": entry["group"], "metrics": {},
                                         "visibility": {}, "identities": 0, "failed": 0, "unavailable": set()})
            if entry.get("status") == "unavailable":
                row["unavailable"].add(entry.get("reason") or "unavailable")
                continue
            if entry.get("status") != "ok":
                row["failed"] += 1
                continue
            row["identities"] += 1
            for name, m in entry.get("metrics", {}).items():
                slot = row["metrics"].setdefault(name, {"values": [], "backend": m["backend"], "reasons": set()})
                if m["value"] is None:
                    slot["reasons"].add(m.get("reason") or "unavailable")
                else:
                    slot["values"].append(m["value"])
            for name, v in entry.get("visibility", {}).items():
                if isinstance(v, (int, float)) and v is not None and name != "n":
                    row["visibility"].setdefault(name, []).append(float(v))
    for row in table.values():
        for slot in row["metrics"].values():
            slot["mean"] = float(np.mean(slot["values"])) if slot["values"] else None
            slot["reasons"] = sorted(slot["reasons"])
        row["visibility"] = {k: float(np.mean(v)) for k, v in row["visibility"].items() if v}
        row["unavailable"] = sorted(row["unavailable"])
    return table


def groups(table: dict[str, dict[str, Any]], purified: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    """[(method, [source keys: clean first, then that method's sets])]; just clean when nothing is protected.

    Purified sets (`purified` keys) have their own section, side by side with the set they purify.
    """
    order: list[str] = []
    for row in table.values():
        if row["group"] != "clean" and row["group"] not in order:
            order.append(row["group"])
    clean = [k for k, r in table.items() if r["group"] == "clean"]
    if not order:
        return [("clean", clean)]
    return [(g, clean + [k for k, r in table.items() if r["group"] == g and k not in purified]) for g in order]


def backend_names(results: list[dict[str, Any]]) -> dict[str, str]:
    for res in results:
        if res.get("backends"):
            return dict(res["backends"])
    return {m: "unavailable: no identity was evaluated" for m in METRICS}


def _best(table: dict[str, Any], keys: list[str], metric: str) -> str | None:
    vals = [(table[k]["metrics"].get(metric, {}).get("mean"), k) for k in keys if table[k]["group"] != "clean"]
    vals = [(v, k) for v, k in vals if v is not None]
    if len(vals) < 2:
        return None
    ranked = sorted(vals, reverse=DIRECTION[metric] > 0)
    if math.isclose(ranked[0][0], ranked[1][0], rel_tol=1e-9, abs_tol=1e-12):
        return None  # a tie: nothing stands out
    return ranked[0][1]


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# -- images --------------------------------------------------------------------------------------

def _thumb(rgb: np.ndarray, size: int = THUMB) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def strip(images: list[np.ndarray], size: int = THUMB, gap: int = 4) -> bytes:
    """Thumbnails side by side on white, as PNG bytes."""
    thumbs = [_thumb(a, size) for a in images]
    width = sum(t.width for t in thumbs) + gap * (len(thumbs) - 1)
    canvas = Image.new("RGB", (max(width, 1), size), "white")
    x = 0
    for t in thumbs:
        canvas.paste(t, (x, (size - t.height) // 2))
        x += t.width + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def amplified(clean: np.ndarray, protected: np.ndarray, k: float = AMPLIFY) -> np.ndarray:
    """clip(0.5 + (protected − clean)·k) on [0, 1], as uint8: grey where nothing changed."""
    delta = (protected.astype(np.float32) - clean.astype(np.float32)) / 255.0
    return unit_to_uint8(0.5 + delta * k)


def _photos(src: dict[str, Any], identity: str, files: EvalFiles) -> dict[str, np.ndarray]:
    source = Source(src["key"], src["label"], src.get("group", ""), src["root"], src["protected"])
    return load_photo_set(source, identity, files)[0]  # unreadable photos are already listed as errors


def identity_figures(out: str, res: dict[str, Any], sources: list[dict[str, Any]],
                     files: EvalFiles) -> list[dict[str, str]]:
    """Write this identity's strips; returns rows [{label, kind, src}] with src relative to `out`."""
    ident = res["identity"]
    folder = f"img/{slugify(ident)}"
    rows: list[dict[str, str]] = []

    def figure(label: str, kind: str, images: list[np.ndarray], name: str) -> None:
        rel = f"{folder}/{name}.png"
        files.write(join(out, rel), strip(images))
        rows.append({"label": label, "kind": kind, "src": rel})

    clean_src = next(s for s in sources if not s["protected"])
    clean = _photos(clean_src, ident, files)
    stems = sorted(clean)
    if stems:
        figure("clean photos", "input", [clean[s] for s in stems], "clean")
    for src in sources:
        if not src["protected"] or src.get("transform"):
            continue
        prot = _photos(src, ident, files)
        common = [s for s in stems if s in prot and prot[s].shape == clean[s].shape]
        if not prot:
            continue
        order = common or sorted(prot)
        figure(f"{src['label']} — protected", "input", [prot[s] for s in order], f"{src['key']}-protected")
        if common:
            figure(f"{src['label']} — perturbation ×{AMPLIFY:g}", "perturbation",
                   [amplified(clean[s], prot[s]) for s in common], f"{src['key']}-perturbation")
    for src in sources:
        entry = res.get("sources", {}).get(src["key"], {})
        samples = entry.get("samples") or []
        if not samples:
            continue
        imgs = [files.read_photo(join(out, p)) for p in samples[:MAX_SAMPLES_SHOWN]]
        figure(f"{src['label']} — attacker's samples", "samples", imgs, f"{src['key']}-samples")
    return rows


# -- HTML / Markdown -------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:linear-gradient(120deg,#1d2b53,#3a5ba0);color:#fff;padding:28px 40px}
header h1{margin:0 0 6px;font-size:26px} header p{margin:0;opacity:.85}
header code{background:rgba(255,255,255,.18);color:#fff}
main{padding:24px 40px;max-width:1200px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 22px;margin:0 0 22px}
h2{margin:0 0 12px;font-size:19px} h3{margin:18px 0 8px;font-size:16px;color:#3a5ba0}
table{border-collapse:collapse;width:100%;font-size:14px}
table.metrics{table-layout:fixed} table.metrics th:first-child{width:20%} table.metrics th:last-child{width:5%}
th,td{padding:7px 10px;text-align:right;border-bottom:1px solid #e6e8ee}
th:first-child,td:first-child{text-align:left}
th{background:#f0f2f7;font-weight:600;vertical-align:bottom} th small{display:block;font-weight:400;color:#68708a}
tr.clean td{color:#555;background:#fafbfc} td.best{font-weight:700;color:#0a7a3e}
td.na{color:#a0a6b6} .tag{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;margin-left:4px}
.stand{background:#fff3d6;color:#8a5a00} .paper{background:#dff5e7;color:#0a7a3e} .off{background:#eee;color:#777}
.figrow{display:flex;align-items:center;margin:6px 0} .figrow .lbl{width:260px;font-size:13px;color:#444}
.figrow img{border-radius:4px;max-width:calc(100% - 270px);image-rendering:auto}
.figrow.perturbation .lbl{color:#8a3ab9} .figrow.samples .lbl{color:#0a5aa0}
.note{font-size:13px;color:#555} code{background:#f0f2f7;padding:1px 4px;border-radius:3px}
.err{color:#b00020;font-size:13px}
section.warn{background:#fff8e1;border-left:4px solid #f0a500;font-size:14px}
table.left td,table.left th{text-align:left}
""" + report_purify.CSS


def _table_html(table: dict[str, Any], keys: list[str], backends: dict[str, str], show_lpips: bool) -> str:
    vis_cols = [c for c in VIS_COLUMNS if c[0] != "lpips" or show_lpips]
    head = "".join(f"<th>{metric_header(m, backends.get(m, ''))}</th>" for m in METRICS)
    head += "".join(f"<th>{label}<small>vs clean</small></th>" for _, label, _ in vis_cols)
    head += "<th>ids</th>"
    best = {m: _best(table, keys, m) for m in METRICS}
    body = []
    for key in keys:
        row = table[key]
        cells = []
        for m in METRICS:
            slot = row["metrics"].get(m, {})
            mean = slot.get("mean")
            cls = "best" if best[m] == key else ("na" if mean is None else "")
            why = "; ".join(slot.get("reasons", []))
            title = f' title="{html.escape(why)}"' if why else ""
            cells.append(f'<td class="{cls}"{title}>{fmt(mean)}</td>')
        for name, _, spec in vis_cols:
            v = row["visibility"].get(name)
            shown = "—" if row["group"] == "clean" else fmt(v, spec)
            cells.append(f'<td class="{"na" if v is None else ""}">{shown}</td>')
        ids = f"{row['identities']}" + (f' <span class="err">({row["failed"]} failed)</span>' if row["failed"] else "")
        cls = ' class="clean"' if row["group"] == "clean" else ""
        body.append(f"<tr{cls}><td>{html.escape(row['label'])}</td>{''.join(cells)}<td>{ids}</td></tr>")
    return (f"<table class='metrics'><thead><tr><th>photo set</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _backend_html(backends: dict[str, str]) -> str:
    rows = []
    for m in METRICS:
        name = backends.get(m, "")
        if name.startswith("unavailable"):
            tag = '<span class="tag off">unavailable</span>'
        elif PAPER_BACKENDS[m].lower() in name.lower() and "stand" not in name.lower() and "SFace" not in name:
            tag = '<span class="tag paper">paper\'s backend</span>'
        else:
            tag = '<span class="tag stand">offline stand-in</span>'
        rows.append(f"<tr><td>{m}</td><td>{html.escape(name)}{tag}</td><td>{PAPER_BACKENDS[m]}</td></tr>")
    return ("<table class='left'><thead><tr><th>metric</th><th>backend used</th><th>paper's backend</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def render(out: str | PathLike, results: list[dict[str, Any]], meta: dict[str, Any],
           files: EvalFiles | None = None) -> tuple[str, str]:
    """Write report.html and summary.md under `out` (figures under out/img/); returns both URIs."""
    files = files or EvalFiles()
    out = normalize_uri(str(out))
    table = aggregate(results)
    backends = backend_names(results)
    show_lpips = any("lpips" in r["visibility"] for r in table.values())
    sources = meta["sources"]
    purified = {s["key"] for s in sources if s.get("base") or s.get("transform")}
    figures = {res["identity"]: identity_figures(out, res, sources, files) for res in results}

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>capray evaluate</title><style>{CSS}</style>"
             "</head><body><header><h1>capray evaluate — can an attacker still learn the face?</h1>"
             f"<p>{_plural(len(results), 'identity', 'identities')} · DreamBooth {meta['train_steps']} steps "
             f"(lr {meta['learning_rate']:g}, batch {meta['batch_size']}{', LoRA' if meta.get('lora') else ''}) "
             f"on <code>{html.escape(meta['model'])}</code> · "
             f"{meta['images_per_prompt']} images × {len(meta['prompts'])} prompts</p></header><main>"]
    if meta["model"] == "tiny":
        parts.append("<section class='warn'><b>Tiny random model.</b> The attacker here is a few-thousand-parameter "
                     "random SD, so its samples are noise and FDFR/ISM say nothing about protection: this run checks "
                     "the pipeline. Use <code>--model</code> with SD 2.1 and <code>--preset paper</code> on a GPU "
                     "for real numbers.</section>")
    parts.append("<section><h2>Protection, per method</h2><p class='note'>Arrows point to stronger protection; "
                 "the strongest protected row per metric is <b style='color:#0a7a3e'>green</b>. Metrics are means "
                 "over identities; visibility columns compare the protected photos with the clean ones. "
                 "Purified sets are under <a href='#purifications'>Purifications</a>.</p>")
    for group, keys in groups(table, purified):
        parts.append(f"<h3>{html.escape(group)}</h3>" + _table_html(table, keys, backends, show_lpips))
    parts.append("</section>")
    parts.append(report_purify.section_html(table, meta, backends))
    parts.append("<section><h2>Metric backends</h2>" + _backend_html(backends) + "</section>")
    for res in results:
        ident = html.escape(res["identity"])
        parts.append(f"<section><h2>{ident}</h2>")
        if res.get("status") == "failed":
            parts.append(f"<p class='err'>failed: {html.escape(res.get('error', ''))}</p>")
        for row in figures.get(res["identity"], []):
            parts.append(f"<div class='figrow {row['kind']}'><div class='lbl'>{html.escape(row['label'])}</div>"
                         f"<img src='{html.escape(row['src'])}' alt='{html.escape(row['label'])}'></div>")
        for entry in res.get("sources", {}).values():
            if entry.get("status") == "failed":
                parts.append(f"<p class='err'>{html.escape(entry['label'])}: {html.escape(entry.get('error', ''))}</p>")
            for err in entry.get("errors", []) or []:
                parts.append(f"<p class='err'>{html.escape(entry['label'])}: {html.escape(err)}</p>")
        for err in res.get("errors", []):
            parts.append(f"<p class='err'>{html.escape(err)}</p>")
        parts.append("</section>")
    notes = sorted({n for res in results for n in res.get("notes", [])})
    if notes:
        parts.append("<section><h2>Notes</h2>" + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
                     + "</section>")
    parts.append("</main></body></html>")
    html_path = join(out, "report.html")
    files.write(html_path, "".join(parts).encode("utf-8"))

    md = [f"# capray evaluate\n\n{_plural(len(results), 'identity', 'identities')} · "
          f"DreamBooth {meta['train_steps']} steps on `{meta['model']}` · "
          f"{meta['images_per_prompt']} images × {len(meta['prompts'])} prompts\n"]
    if meta["model"] == "tiny":
        md.append("> Tiny random model: its samples are noise, so these numbers check the pipeline, not protection.\n")
    for group, keys in groups(table, purified):
        md.append(f"\n## {group}\n")
        heads = [f"{m} {arrow(m)} ({short_backend(backends.get(m, ''))})" for m in METRICS]
        md.append("| photo set | " + " | ".join(heads) + " | PSNR dB | SSIM | ids |")
        md.append("|---" * (len(heads) + 4) + "|")
        for key in keys:
            row = table[key]
            vals = [fmt(row["metrics"].get(m, {}).get("mean")) for m in METRICS]
            vis = ["—", "—"] if row["group"] == "clean" else [fmt(row["visibility"].get("psnr"), "{:.2f}"),
                                                            fmt(row["visibility"].get("ssim"))]
            md.append(f"| {row['label']} | " + " | ".join(vals + vis) + f" | {row['identities']} |")
    md += report_purify.section_md(table, meta, backends)
    md.append("\n## Backends\n")
    for m in METRICS:
        md.append(f"- **{m}**: {backends.get(m, '')} (paper: {PAPER_BACKENDS[m]})")
    md.append("\n## Images\n")
    for ident, rows in figures.items():
        md.append(f"\n### {ident}\n")
        md += [f"**{r['label']}**\n\n![{r['label']}]({r['src']})\n" for r in rows]
    md_path = join(out, "summary.md")
    files.write(md_path, ("\n".join(md) + "\n").encode("utf-8"))
    return html_path, md_path
