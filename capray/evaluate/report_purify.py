"""The report's purification section: per protected set and per purification, each metric for the clean,
the protected and the protected-then-purified photos side by side, with what the purification ran.

A purified value back near the clean one means the purification stripped the protection. A purification
that could not run (its model is missing) is listed with why and how to supply the weights, never with
a number.
"""

from __future__ import annotations

import html
from typing import Any

from capray.evaluate.metrics import METRICS
from capray.evaluate.report_cells import arrow, fmt, metric_header, short_backend

COLUMNS = ("clean", "protected", "purified")


def blocks(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """[{label, key, rows}] per protected set; each row: the purification, its parameters, the three source
    keys it compares and, where it could not run, why."""
    sources = meta["sources"]
    info = {p["spec"]: p for p in meta.get("purifications", [])}
    clean_key = next((s["key"] for s in sources if not s["protected"]), "clean")
    out = []
    for base in (s for s in sources if s["protected"] and not s.get("base")):
        rows = []
        for src in (s for s in sources if s.get("base") == base["key"]):
            about = info.get(src.get("purification"), {})
            seen = table.get(src["key"], {})
            reasons = seen.get("unavailable") or ([src["unavailable"]] if src.get("unavailable") else [])
            rows.append({"label": about.get("label", src.get("transform")), "spec": src.get("purification"),
                         "parameters": about.get("parameters", {}), "unavailable": "; ".join(reasons) or None,
                         "keys": (clean_key, base["key"], src["key"])})
        if rows:
            out.append({"label": base["label"], "key": base["key"], "rows": rows})
    return out


def unavailable(meta: dict[str, Any], found: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """[(spec, label, reason)] of every purification that could not run, once each."""
    listed: dict[str, tuple[str, str, str]] = {}
    for p in meta.get("purifications", []):
        if p.get("unavailable"):
            listed[p["spec"]] = (p["spec"], p["label"], p["unavailable"])
    for block in found:
        for row in block["rows"]:
            if row["unavailable"] and row["spec"] not in listed:
                listed[row["spec"]] = (row["spec"], row["label"], row["unavailable"])
    return list(listed.values())


def parameters_text(parameters: dict[str, Any]) -> str:
    """`quality=75, subsampling=4:2:0` (an empty string shows as "")."""
    return ", ".join(f"{k}={v}" if v != "" else f'{k}=""' for k, v in parameters.items())


def _value(table: dict[str, Any], key: str, metric: str) -> float | None:
    return table.get(key, {}).get("metrics", {}).get(metric, {}).get("mean")


def _undone(clean: float | None, protected: float | None, purified: float | None) -> bool:
    """The purified value is nearer the clean one than the protected one: protection mostly stripped."""
    if clean is None or protected is None or purified is None or clean == protected:
        return False
    return abs(purified - clean) < abs(purified - protected)


def _ids(row: dict[str, Any] | None) -> str:
    if not row:
        return "0"
    failed = f' <span class="err">({row["failed"]} failed)</span>' if row["failed"] else ""
    return f"{row['identities']}{failed}"


CSS = """
table.purify{font-size:12.5px} table.purify td.params{text-align:left;color:#555;font-size:12px;max-width:260px}
table.purify th.sub{font-weight:400;color:#68708a;font-size:11.5px}
table.purify td.gap,table.purify th.gap{border-left:2px solid #e6e8ee}
td.undone{color:#b00020;font-weight:700} td.off{text-align:left;color:#8a5a00;background:#fffaf0}
"""


def section_html(table: dict[str, Any], meta: dict[str, Any], backends: dict[str, str]) -> str:
    found = blocks(table, meta)
    parts = ["<section id='purifications'><h2>Purifications</h2>"]
    if not found:
        parts.append("<p class='note'>No purification was run. <code>--transform suite</code> runs the standard set "
                     "(JPEG, blur, median, bilateral, resize, noise + denoise, TVM, noisy upscaling, DiffPure) "
                     "before the attacker trains; see docs/evaluation.md#purifications.</p></section>")
        return "".join(parts)
    parts.append("<p class='note'>The attacker ran each purification on the protected photos, then fine-tuned. "
                 "Each metric shows clean | protected | protected-and-purified; a purified value nearer the clean "
                 "than the protected one is <b style='color:#b00020'>red</b>: that purification stripped most of "
                 "the protection on that metric.</p>")
    head = "".join(f"<th colspan='3' class='gap'>{metric_header(m, backends.get(m, ''))}</th>" for m in METRICS)
    sub = "".join(f"<th class='sub{' gap' if i == 0 else ''}'>{c}</th>" for _ in METRICS for i, c in enumerate(COLUMNS))
    for block in found:
        body = []
        for row in block["rows"]:
            cells = [f"<td>{html.escape(row['label'] or '')}</td>",
                     f"<td class='params'>{html.escape(parameters_text(row['parameters']))}</td>"]
            if row["unavailable"] and not table.get(row["keys"][2], {}).get("identities"):
                cells.append(f"<td colspan='{3 * len(METRICS)}' class='off' title='{html.escape(row['unavailable'])}'>"
                             "unavailable: not run (see below)</td>")
            else:
                for m in METRICS:
                    values = [_value(table, k, m) for k in row["keys"]]
                    for i, v in enumerate(values):
                        cls = ["gap"] if i == 0 else []
                        cls += ["na"] if v is None else (["undone"] if i == 2 and _undone(*values) else [])
                        attr = f" class='{' '.join(cls)}'" if cls else ""
                        cells.append(f"<td{attr}>{fmt(v)}</td>")
            cells.append(f"<td>{_ids(table.get(row['keys'][2]))}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        parts.append(f"<h3>{html.escape(block['label'])}</h3><table class='purify'><thead><tr>"
                     f"<th rowspan='2'>purification</th><th rowspan='2'>parameters</th>{head}<th rowspan='2'>ids</th>"
                     f"</tr><tr>{sub}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    missing = unavailable(meta, found)
    if missing:
        rows = "".join(f"<tr><td><code>{html.escape(spec)}</code> {html.escape(label)}</td>"
                       f"<td>{html.escape(reason)}</td></tr>" for spec, label, reason in missing)
        parts.append("<h3>Unavailable purifications</h3><table class='left'><thead><tr><th>purification</th>"
                     f"<th>why, and how to supply the weights</th></tr></thead><tbody>{rows}</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def section_md(table: dict[str, Any], meta: dict[str, Any], backends: dict[str, str]) -> list[str]:
    found = blocks(table, meta)
    md = ["\n## Purifications\n"]
    if not found:
        md.append("No purification was run (`--transform suite` runs the standard set).")
        return md
    md.append("Each metric: clean / protected / protected-and-purified.")
    heads = [f"{m} {arrow(m)} ({short_backend(backends.get(m, ''))})" for m in METRICS]
    for block in found:
        md.append(f"\n### {block['label']}\n")
        md.append("| purification | parameters | " + " | ".join(heads) + " | ids |")
        md.append("|---" * (len(heads) + 3) + "|")
        for row in block["rows"]:
            params = parameters_text(row["parameters"]).replace("|", "\\|")
            seen = table.get(row["keys"][2], {})
            if row["unavailable"] and not seen.get("identities"):
                cells = ["unavailable"] * len(METRICS)
            else:
                cells = [" / ".join(fmt(_value(table, k, m)) for k in row["keys"]) for m in METRICS]
            md.append(f"| {row['label']} | {params} | " + " | ".join(cells) + f" | {seen.get('identities', 0)} |")
    missing = unavailable(meta, found)
    if missing:
        md.append("\n### Unavailable purifications\n")
        md += [f"- `{spec}` ({label}): {reason}" for spec, label, reason in missing]
    return md
