"""`capray demo`: the main job end to end on the bundled sample identities, then a one-screen summary.

It builds the tiny random SD model on first use, starts a local Ray (or joins --address), runs
`capray protect` with the smoke preset and prints what was protected and where it went. Rerunning
with the same output resumes (identities already done are skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"  # bundled: capray/samples/<identity>/*.png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="out/demo", help="output folder (default: ./out/demo)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def _fmt(values, fmt: str) -> str:
    values = [v for v in (values or []) if v is not None]
    if not values:
        return "-"
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}..{high}"


def summary_lines(output: str) -> list[str]:
    from capray.io.manifest import read_manifest

    rows = sorted(read_manifest(output, steps=True).to_pylist(), key=lambda r: r["identity"])
    lines = [f"{'identity':<12} {'status':<7} {'photos':>6} {'L∞/255':>7} {'PSNR dB':>11} {'SSIM':>11} "
             f"{'λ chosen':>9} {'seconds':>8}"]
    for r in rows:
        lams = [v for v in (r["lambda_schedule"] or []) if v is not None]
        lines.append(f"{r['identity']:<12} {r['status']:<7} {r['num_photos']:>6} "
                     f"{_fmt([r['linf_255_max']], '{:.0f}'):>7} {_fmt(r['psnr'], '{:.1f}'):>11} "
                     f"{_fmt(r['ssim'], '{:.3f}'):>11} {_fmt(lams, '{:.0f}'):>9} "
                     f"{(r['seconds'] or 0):>8.1f}")
        if r["error"]:
            lines.append(f"    error: {r['error']}")
    return lines


def run(args: argparse.Namespace) -> int:
    from capray.batch.command import EXIT_USAGE, protect
    from capray.batch.plan import UsageError
    from capray.config import load_config, parse_set
    from capray.io.storage import normalize_uri

    cfg = load_config(preset="smoke", overrides=parse_set(args.set))
    samples = SAMPLES
    output = normalize_uri(args.output)
    print(f"capray demo: protecting the sample identities in {samples} (smoke preset, tiny model; the first "
          "run builds the model and starts Ray, which takes a little while)", file=sys.stderr)
    try:
        result = protect(str(samples), output, cfg, address=args.address)
    except UsageError as exc:
        print(f"capray demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print()
    print("\n".join(summary_lines(output)))
    print()
    print(f"protected photos: {output}/<identity>/<photo>.png  (original size, lossless PNG)")
    print(f"manifest:         {output}/manifest/  (Parquet, one row per identity)")
    print(f"effective config: {output}/run.json    metrics: {output}/metrics.prom")
    print(f"{result.ok} ok, {result.failed} failed, {result.skipped} already done (rerun resumes)")
    for note in cfg.model.notes:
        print(f"note: {note}")
    return result.exit_code
