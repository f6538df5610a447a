"""Robustness transforms, visibility, folder layout, and the rendered report (no models needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capray.evaluate.layout import check_output, plan_sources, protected_label
from capray.evaluate.report import amplified, render
from capray.evaluate.transforms import parse_transform
from capray.evaluate.visibility import visibility


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((128, 128), Image.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def laplacian_energy(rgb: np.ndarray) -> float:
    g = rgb.astype(np.float64).mean(-1)
    return float(np.var(g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]))


def test_transforms_keep_size_and_degrade_in_order(astronaut):
    q95, q10 = parse_transform("jpeg:95")(astronaut), parse_transform("jpeg:10")(astronaut)
    assert q95.shape == q10.shape == astronaut.shape
    assert psnr(astronaut, q95) > psnr(astronaut, q10) > 15
    blurred = parse_transform("blur:2")(astronaut)
    assert laplacian_energy(blurred) < 0.2 * laplacian_energy(astronaut)
    resized = parse_transform("resize:0.25")(astronaut)
    assert resized.shape == astronaut.shape and not np.array_equal(resized, astronaut)
    assert laplacian_energy(resized) < laplacian_energy(astronaut)
    assert parse_transform("jpeg:75").label == "JPEG q75" and parse_transform("blur:1.5").slug == "blur1.5"


@pytest.mark.parametrize("spec", ["jpeg:0", "blur:-1", "resize:2", "sharpen:1", "jpeg"])
def test_bad_transform_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_transform(spec)


def test_visibility_matches_textbook_psnr(astronaut):
    rng = np.random.default_rng(0)
    prot = np.clip(astronaut.astype(int) + rng.integers(-3, 4, astronaut.shape), 0, 255).astype(np.uint8)
    vis = visibility(astronaut, prot)
    assert vis["psnr"] == pytest.approx(psnr(astronaut, prot), rel=1e-6)
    assert vis["linf_255"] == 3.0 and 0.9 < vis["ssim"] < 1.0
    assert math.isinf(visibility(astronaut, astronaut)["psnr"])
    with pytest.raises(ValueError):
        visibility(astronaut, astronaut[:64])


def test_amplified_perturbation_is_grey_where_unchanged(astronaut):
    assert (amplified(astronaut, astronaut) == 128).all()
    plus_one = np.clip(astronaut.astype(int) + 1, 0, 255).astype(np.uint8)
    out = amplified(astronaut, plus_one, k=10)
    inside = astronaut < 255
    assert (out[inside] == round((0.5 + 10 / 255) * 255)).all()


def write_set(root: Path, identity: str, images: dict[str, np.ndarray]) -> None:
    (root / identity).mkdir(parents=True, exist_ok=True)
    for stem, rgb in images.items():
        Image.fromarray(rgb).save(root / identity / f"{stem}.png")


def test_layout_labels_from_run_json_and_ignores_manifest(tmp_path):
    aspl = tmp_path / "out-a"
    (aspl / "manifest").mkdir(parents=True)
    (aspl / "alice").mkdir()
    (aspl / "run.json").write_text(json.dumps({"attack": {"method": "aspl"}, "cap": {"enabled": True}}))
    plain = tmp_path / "mine"
    plain.mkdir()
    assert protected_label(aspl) == ("ASPL+CAP", "ASPL", True)
    assert protected_label(plain) == ("mine", "mine", None)
    robust = tmp_path / "out-r"
    robust.mkdir()
    (robust / "run.json").write_text(json.dumps({"config": {"attack": {"method": "fsmg", "robust": {"enabled": True}},
                                                            "cap": {"enabled": True}}}))
    assert protected_label(robust) == ("FSMG+CAP robust", "FSMG", True)
    sources = plan_sources(tmp_path / "clean", [aspl, plain], [parse_transform("jpeg:75")])
    assert [s.label for s in sources] == ["clean", "ASPL+CAP", "ASPL+CAP · JPEG q75", "mine", "mine · JPEG q75"]
    assert len({s.key for s in sources}) == len(sources)
    from capray.evaluate.layout import list_identities

    assert list_identities(aspl) == ["alice"]
    with pytest.raises(ValueError, match="overlaps"):
        check_output(aspl / "report", [tmp_path / "clean", aspl])


def fake_metrics(fdfr: float, ism: float | None) -> dict:
    def v(x, backend, reason=None):
        return {"value": x, "backend": backend, "reason": reason, "n": 2}

    return {"FDFR": v(fdfr, "YuNet"), "ISM": v(ism, "SFace"), "SER-FIQ": v(None, "SFace dropout", "no face detected"),
            "BRISQUE": v(20.0, "brisque (LIVE SVM)"),
            "CLIP-IQA": v(None, "unavailable: no CLIP weights", "no CLIP weights")}


def test_report_renders_tables_and_every_image(tmp_path, astronaut):
    clean_root, prot_root, out = tmp_path / "clean", tmp_path / "prot", tmp_path / "out"
    rng = np.random.default_rng(1)
    clean = {"p0": astronaut, "p1": astronaut[:, ::-1].copy()}
    prot = {k: np.clip(v.astype(int) + rng.integers(-4, 5, v.shape), 0, 255).astype(np.uint8) for k, v in clean.items()}
    write_set(clean_root, "alice", clean)
    write_set(prot_root, "alice", prot)
    (prot_root / "run.json").write_text(json.dumps({"attack": {"method": "simac"}, "cap": {"enabled": True}}))
    sources = plan_sources(clean_root, [prot_root], [])
    samples = {}
    for src in sources:
        paths = []
        for i in range(3):
            rel = Path("generated") / "alice" / src.key / "0-a-photo" / f"{i:03d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out / rel)
            paths.append(str(rel))
        samples[src.key] = paths
    result = {"identity": "alice", "status": "ok", "errors": [], "notes": ["YuNet/SFace stand-ins"],
              "backends": {"FDFR": "YuNet", "ISM": "SFace", "SER-FIQ": "SFace dropout",
                           "BRISQUE": "brisque (LIVE SVM)", "CLIP-IQA": "unavailable: no CLIP weights"},
              "sources": {
                  "clean": {"label": "clean", "group": "clean", "status": "ok", "metrics": fake_metrics(0.0, 0.8),
                            "samples": samples["clean"]},
                  sources[1].key: {"label": "SimAC+CAP", "group": "SimAC", "status": "ok",
                                   "metrics": fake_metrics(0.5, 0.3), "samples": samples[sources[1].key],
                                   "visibility": visibility(clean["p0"], prot["p0"]) | {"n": 1}}}}
    meta = {"model": "tiny", "train_steps": 2, "learning_rate": 5e-7, "batch_size": 2, "prompts": ["a photo"],
            "images_per_prompt": 3, "sources": [{"key": s.key, "label": s.label, "root": s.root,
                                                 "protected": s.protected, "transform": None} for s in sources]}
    html_path, md_path = render(out, [result], meta)
    text = Path(html_path).read_text()
    assert text.count("<table") >= 2 and "SimAC+CAP" in text and "FDFR" in text and "YuNet" in text
    assert "offline stand-in" in text and "unavailable" in text
    srcs = re.findall(r"<img src='([^']+)'", text)
    # clean strip, protected strip, perturbation strip, two sample strips
    assert len(srcs) == 5
    for src in srcs:
        img = Image.open(out / src)
        assert img.format == "PNG" and img.width > 0
    md = Path(md_path).read_text()
    assert "| SimAC+CAP | 0.5000 | 0.3000 | n/a |" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file()


def test_aggregate_means_over_identities_and_counts_failures():
    from capray.evaluate.report import aggregate

    def res(ident, fdfr, ism, status="ok"):
        entry = {"label": "ASPL", "group": "ASPL", "status": status, "metrics": fake_metrics(fdfr, ism),
                 "visibility": {"n": 4, "psnr": 40.0 + fdfr, "lpips": None}}
        return {"identity": ident, "sources": {"aspl": entry}}

    table = aggregate([res("a", 0.25, 0.5), res("b", 0.75, None), res("c", 1.0, 0.1, status="failed")])
    row = table["aspl"]
    assert row["identities"] == 2 and row["failed"] == 1
    assert row["metrics"]["FDFR"]["mean"] == pytest.approx(0.5)
    assert row["metrics"]["ISM"]["mean"] == pytest.approx(0.5)  # b had no value: not counted as 0
    assert row["metrics"]["SER-FIQ"]["mean"] is None and row["metrics"]["SER-FIQ"]["reasons"] == ["no face detected"]
    assert row["visibility"] == {"psnr": pytest.approx(40.5)}
