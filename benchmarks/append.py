"""What a growing library costs every night: append vs reprotect after one photo is added to 1% of identities.

A library of N identities with P photos each is protected once into two outputs, one per
`batch.on_added_photos` policy (by a stand-in engine: this first night is not what is measured).
Then one photo is added to 1% of the identities and each output gets its nightly rerun with the
real engine (the tiny SD-format model, smoke preset, on this machine's CPU), side by side:

- engine calls (identities the engine ran on) and photos it protected;
- engine seconds: the sum of the manifest's `engine_seconds` over the rerun's rows (the same
  process, model and settings for both policies, so their ratio is the figure);
- published photos rewritten: outputs that existed before the rerun and changed bytes (each one
  is a photo an attacker may now hold in two differently perturbed copies).

Last line:
RESULT append n=<N> photos=<P> changed=<k> append_engine_calls=<n> reprotect_engine_calls=<n>
    append_photos_protected=<n> reprotect_photos_protected=<n> append_engine_s=<s> reprotect_engine_s=<s>
    engine_s_ratio=<append/reprotect> append_republished=<n> reprotect_republished=<n>
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from capray.batch.stages import ProtectStage  # noqa: E402


class StandIn(ProtectStage):
    """The first night only: no models, each photo +1 (mod 256), so outputs differ from inputs."""

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        return [(a + 1).astype(np.uint8) for a in rgbs], ProtectionRecord.unprotected(self.cfg, identity)


def photo(rng, size: int) -> bytes:
    """A smooth random face-sized-for-the-model photo (PNG)."""
    low = rng.integers(30, 225, size=(size // 8, size // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(low).resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def outputs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.glob("id*/*.png")}


def rerun_rows(out: Path) -> list[dict]:
    import json

    import pyarrow.parquet as pq

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    return [r for r in pq.read_table(out / "manifest").to_pylist() if r["run_id"] == run_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="identities in the library")
    parser.add_argument("--photos", type=int, default=8, help="photos per identity")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of identities that gain a photo")
    parser.add_argument("--size", type=int, default=64, help="photo side in pixels (the smoke model's resolution)")
    args = parser.parse_args()

    import ray

    from capray.batch.command import protect
    from capray.config import load_config

    cfg = {policy: load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "batch": {
        "on_added_photos": policy, "cpus_per_actor": 0.5, "group_retries": 0}}) for policy in ("append", "reprotect")}
    root = Path(tempfile.mkdtemp(prefix="capray-append-"))
    src = root / "in"
    rng = np.random.default_rng(0)
    for i in range(args.n):
        (src / f"id{i:05d}").mkdir(parents=True)
        for j in range(args.photos):
            (src / f"id{i:05d}" / f"{j}.png").write_bytes(photo(rng, args.size))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    for policy in cfg:
        first = protect(str(src), str(root / policy), cfg[policy], show_progress=False, protect_stage=StandIn)
        assert first.ok == args.n, first
    chosen = sorted(rng.choice(args.n, size=max(1, round(args.n * args.changed)), replace=False))
    for i in chosen:
        (src / f"id{i:05d}" / "added.png").write_bytes(photo(rng, args.size))

    figures = {}
    for policy in cfg:
        out = root / policy
        before = outputs(out)
        t0 = time.perf_counter()
        night = protect(str(src), str(out), cfg[policy], show_progress=False)
        wall = time.perf_counter() - t0
        after = outputs(out)
        rows = [r for r in rerun_rows(out) if r["status"] == "ok"]
        figures[policy] = {
            "engine_calls": sum(1 for r in rows if r["pgd_steps"]),
            "photos_protected": sum(len(r["protected_uris"]) for r in rows),
            "engine_s": sum(r["engine_seconds"] or 0.0 for r in rows),
            "republished": sum(1 for k, v in before.items() if after.get(k, v) != v),
        }
        print(f"{policy:>9}: {night.ok} identities redone in {wall:.1f}s wall; engine ran on "
              f"{figures[policy]['engine_calls']} ({figures[policy]['photos_protected']} photos protected) for "
              f"{figures[policy]['engine_s']:.1f}s; {figures[policy]['republished']} published photos rewritten",
              flush=True)
    ray.shutdown()
    a, r = figures["append"], figures["reprotect"]
    print(f"RESULT append n={args.n} photos={args.photos} changed={len(chosen)} "
          f"append_engine_calls={a['engine_calls']} reprotect_engine_calls={r['engine_calls']} "
          f"append_photos_protected={a['photos_protected']} reprotect_photos_protected={r['photos_protected']} "
          f"append_engine_s={a['engine_s']:.1f} reprotect_engine_s={r['engine_s']:.1f} "
          f"engine_s_ratio={a['engine_s'] / r['engine_s']:.2f} "
          f"append_republished={a['republished']} reprotect_republished={r['republished']}")


if __name__ == "__main__":
    sys.exit(main())
