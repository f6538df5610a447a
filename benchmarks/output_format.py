"""What `output.format: webp` saves over PNG on real photos, and that it stores the same pixels.

1. `capray protect` (local Ray, the tiny model at the real model's 512 px) on the 12 shared face photos,
   once with `output.format: png` and once with `webp`: the protected files' total bytes, and every
   photo's decoded pixels compared between the two (they must be equal).
2. The same photos under the densest perturbation there is — an independent ±eps sign on every
   channel of every pixel — and clean: the saving is a property of the pixels, so these bound it.
3. Encoding time per photo, PNG vs WebP, side by side in this process.

Last line: RESULT output_format png_mb=<m> webp_mb=<m> saving_pct=<p> same_pixels=<bool>
           dense_saving_pct=<p> clean_saving_pct=<p> encode_ms_png=<t> encode_ms_webp=<t>
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "n000050"


def photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def protect_as(fmt: str, src: Path, out: Path, resolution: int) -> list[Path]:
    from capray.batch.command import protect
    from capray.config import load_config

    cfg = load_config(preset="smoke", overrides={
        "model": {"resolution": resolution}, "output": {"format": fmt},
        "batch": {"gpus_per_actor": 0, "cpus_per_actor": 1.0, "max_photos_per_identity": 64}})
    summary = protect(str(src), str(out), cfg, show_progress=False)
    assert summary.ok == 1, summary
    return sorted((out / "n000050").glob(f"*.{fmt}"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def encoded_sizes(arrays: list[np.ndarray]) -> tuple[int, int, float, float]:
    """(PNG bytes, WebP bytes, ms per photo PNG, ms per photo WebP), both encoders timed in turn."""
    from capray.io.images import encode_photo

    sizes, times = {"png": 0, "webp": 0}, {"png": 0.0, "webp": 0.0}
    for arr in arrays:
        for fmt in ("png", "webp"):
            start = time.perf_counter()
            data = encode_photo(arr, fmt=fmt).data
            times[fmt] += time.perf_counter() - start
            sizes[fmt] += len(data)
    n = len(arrays)
    return sizes["png"], sizes["webp"], 1000 * times["png"] / n, 1000 * times["webp"] / n


def saving(png: int, webp: int) -> float:
    return 100.0 * (1 - webp / png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512, help="model resolution (the real model's: 512)")
    parser.add_argument("--eps-255", type=int, default=6, help="the dense perturbation's size (0.05 → 6)")
    args = parser.parse_args()

    import ray

    from capray.io.images import decode_image

    faces = photos(FACES)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "in" / "n000050"
        src.mkdir(parents=True)
        for i, face in enumerate(faces):  # one identity of 12 photos, as a platform would hold them
            shutil.copy(face, src / f"{i:02d}_{face.name}")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            png_files = protect_as("png", src.parent, work / "out-png", args.resolution)
            webp_files = protect_as("webp", src.parent, work / "out-webp", args.resolution)
        finally:
            ray.shutdown()
        assert [p.stem for p in png_files] == [p.stem for p in webp_files] and len(png_files) == len(faces)
        same = all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(png_files, webp_files))
        png_bytes, webp_bytes = sum(p.stat().st_size for p in png_files), sum(p.stat().st_size for p in webp_files)

    clean = [decode_image(p.read_bytes(), max_pixels=10**8).rgb for p in faces]
    rng = np.random.default_rng(0)
    dense = [np.clip(a.astype(int) + rng.choice([-args.eps_255, args.eps_255], a.shape), 0, 255).astype(np.uint8)
             for a in clean]
    c_png, c_webp, _, _ = encoded_sizes(clean)
    d_png, d_webp, ms_png, ms_webp = encoded_sizes(dense)
    shape = clean[0].shape
    print(f"{len(faces)} shared face photos ({shape[1]}x{shape[0]}), tiny model at {args.resolution} px")
    print(f"capray protect outputs: PNG {png_bytes / 1e6:.2f} MB, WebP {webp_bytes / 1e6:.2f} MB "
          f"({saving(png_bytes, webp_bytes):.1f}% smaller), same pixels: {same}")
    print(f"dense ±{args.eps_255} perturbation: PNG {d_png / 1e6:.2f} MB, WebP {d_webp / 1e6:.2f} MB "
          f"({saving(d_png, d_webp):.1f}% smaller); clean photos: {saving(c_png, c_webp):.1f}% smaller")
    print(f"encoding per photo: PNG {ms_png:.0f} ms, WebP {ms_webp:.0f} ms")
    print(f"RESULT output_format png_mb={png_bytes / 1e6:.2f} webp_mb={webp_bytes / 1e6:.2f} "
          f"saving_pct={saving(png_bytes, webp_bytes):.1f} same_pixels={same} "
          f"dense_saving_pct={saving(d_png, d_webp):.1f} clean_saving_pct={saving(c_png, c_webp):.1f} "
          f"encode_ms_png={ms_png:.0f} encode_ms_webp={ms_webp:.0f}")


if __name__ == "__main__":
    main()
