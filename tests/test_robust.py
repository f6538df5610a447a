"""`attack.robust` (expectation over transformations): the transforms, and the engine under them.

Each transform is differentiable, deterministic under a seed and changes what it should; the JPEG
approximation is checked against PIL's real encoder. In the engine: off gives the pixels capray gave
before the mode existed (digests taken from that code), the fast λ search equals Algorithm 1 under it
in fp64, and on real photos it changes the perturbation while ‖δ‖∞ ≤ ε still holds.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from capray import protect_group
from capray.attack.diff_jpeg import jpeg, quality_table
from capray.attack.robust import Augment, gaussian_blur, sample_augments
from capray.config import CaprayConfig, RobustConfig, load_config
from capray.models.pixels import from_uint8, to_uint8

from engine_helpers import METHOD_STEPS, RES, assert_same, load_faces, mixed_group

ON = {"enabled": True}
EVERY_LINK = Augment(crop=(0.9, 0.3, 0.7), flip=True, resize=0.6, blur=1.0, jpeg=70)


def face(faces_dir, size: int | None = None) -> torch.Tensor:
    img = Image.open(sorted(faces_dir.glob("set_B/*.png"))[0]).convert("RGB")
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    return from_uint8(np.asarray(img)).double()[None]


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x[0])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


# -- the transforms ----------------------------------------------------------------------------

@pytest.mark.parametrize("quality", [50, 75, 90])
def test_differentiable_jpeg_matches_pil(faces_dir, quality):
    """Closer than 38 dB PSNR to PIL's own round trip, and far closer to it than it is to the photo."""
    x = face(faces_dir)
    buf = io.BytesIO()
    Image.fromarray(as_uint8(x)).save(buf, format="JPEG", quality=quality)
    real = np.asarray(Image.open(buf).convert("RGB"))
    ours = as_uint8(jpeg(x, quality))
    assert psnr(ours, real) > 38
    assert psnr(ours, real) > psnr(real, as_uint8(x)) + 5


def test_quality_tables_follow_libjpeg():
    def first(value: int, quality: int) -> float:
        return float(quality_table([value] * 64, quality)[0, 0])

    assert first(16, 50) == 16  # quality 50: the Annex K table itself
    assert first(16, 75) == 8  # (16·50 + 50) // 100
    assert first(16, 10) == 80  # 5000 / 10 = 500 %
    assert first(99, 100) == 1  # never 0


@pytest.mark.parametrize("augment", [
    Augment(jpeg=60), Augment(resize=0.5), Augment(blur=1.2), Augment(crop=(0.85, 0.2, 0.9)), Augment(flip=True),
    EVERY_LINK], ids=lambda a: a.describe())
def test_each_transform_is_differentiable_and_deterministic(faces_dir, augment):
    x = face(faces_dir, 45).requires_grad_(True)  # odd size: the JPEG pads partial blocks
    out = augment(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out.detach(), x.detach())
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(augment(x.detach()), out.detach())


@pytest.mark.parametrize("augment", [Augment(resize=0.5), Augment(blur=1.2), Augment(crop=(0.85, 0.2, 0.9)),
                                     Augment(flip=True)], ids=lambda a: a.describe())
def test_linear_transforms_have_exact_gradients(augment):
    x = torch.rand(1, 3, 12, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(augment, (x,))


def test_a_draws_resize_matrices_live_with_the_draw_not_in_a_module_cache():
    """Random sizes in the shared caches would hold GBs of stale matrices at 12 MP (and, past 64 keys a
    step, rebuild them for every λ-candidate row): an Augment keeps its own, reused across rows, and a
    pickled copy (a peer actor's) carries the parameters only."""
    import pickle

    from capray.attack import group

    group._resize_matrix.cache_clear()
    group._recurring_resize_operators.cache_clear()
    augment = Augment(crop=(0.8, 0.4, 0.6), resize=0.7)
    x = torch.rand(1, 3, 30, 41, dtype=torch.float64)
    first = augment(x)
    built = dict(augment._operators)
    assert len(built) == 3  # crop back up, down, up
    assert torch.equal(augment(x + 0), first)  # another candidate row: the same matrices, not rebuilt
    assert all(augment._operators[k] is v for k, v in built.items()) and len(augment._operators) == 3
    assert group._resize_matrix.cache_info().currsize == 0
    assert group._recurring_resize_operators.cache_info().currsize == 0
    copy = pickle.loads(pickle.dumps(augment))
    assert copy == augment and copy._operators == {} and torch.equal(copy(x), first)
    reference = torch.nn.functional.interpolate(x, size=(21, 29), mode="bilinear", antialias=True,
                                                align_corners=False)
    assert torch.allclose(group.resize(x, (21, 29), group.resize_operators), reference, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.5, 4.0])
def test_separable_blur_equals_torchvision(sigma):
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(1, 3, 40, 52, dtype=torch.float64)
    radius = math.ceil(3 * sigma)
    expected = TF.gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    assert torch.allclose(gaussian_blur(x, sigma), expected, atol=1e-12)


def test_jpeg_gradient_prefers_what_jpeg_keeps(faces_dir):
    """Along a smooth (low-frequency) direction the round trip's derivative is several times larger than
    along a checkerboard (the highest DCT frequency, which quantization removes): the attack is steered
    toward perturbations JPEG keeps."""
    x = face(faces_dir, 64)
    smooth = torch.linspace(-1, 1, 64, dtype=torch.float64).view(1, 1, 1, 64).expand_as(x).contiguous()
    checker = ((torch.arange(64).view(64, 1) + torch.arange(64).view(1, 64)) % 2 * 2 - 1).double().expand_as(x)
    gain = [float(torch.autograd.functional.jvp(lambda t: jpeg(t, 75), (x,), (d.contiguous(),))[1].norm() / d.norm())
            for d in (smooth, checker)]
    assert gain[0] > 3 * gain[1]


def test_draws_are_seeded_per_photo_and_step():
    cfg = RobustConfig(enabled=True, crop_scale=(0.85, 1.0), flip=True)
    assert RobustConfig().kinds == ["resize", "blur", "jpeg"]  # the preset's: crop and flip only when asked
    first = sample_augments(cfg, 8, 0, "alice", "pgd", 3)
    assert first == sample_augments(cfg, 8, 0, "alice", "pgd", 3)
    assert first != sample_augments(cfg, 8, 0, "alice", "pgd", 4)
    assert first != sample_augments(cfg, 8, 0, "bob", "pgd", 3)
    assert len(set(first)) > 1  # per photo
    many = sample_augments(cfg, 400, 1, "x")
    for link in ("jpeg", "resize", "blur", "crop", "flip"):
        share = sum(getattr(a, link) not in (None, False) for a in many) / len(many)
        assert 0.4 < share < 0.6  # probability 0.5 each
    assert all(50 <= a.jpeg <= 90 for a in many if a.jpeg)
    only_jpeg = RobustConfig(enabled=True, probability=1.0, resize_factor=None, blur_sigma=None, crop_scale=None,
                             flip=False, jpeg_quality=(75, 75))
    assert set(sample_augments(only_jpeg, 20, 0)) == {Augment(jpeg=75)}


def test_robust_config_rules():
    with pytest.raises(ValueError, match="jpeg_quality"):
        RobustConfig(jpeg_quality=(90, 50))
    with pytest.raises(ValueError, match="at least one transform"):
        RobustConfig(enabled=True, jpeg_quality=None, resize_factor=None, blur_sigma=None, crop_scale=None,
                     flip=False)
    base = CaprayConfig()
    assert CaprayConfig(attack={"robust": {"samples": 4}}).config_hash() == base.config_hash()  # off: no pixel
    on = load_config(preset="robust")
    assert on.attack.robust.enabled and on.config_hash() != base.config_hash()
    assert load_config(preset="robust", overrides={"attack": {"robust": {"samples": 2}}}).config_hash() \
        != on.config_hash()
    both = load_config(preset="smoke,robust")
    assert both.model.sd == "tiny" and both.attack.robust.enabled
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(preset="smoke,sturdy")


# -- the engine under it -------------------------------------------------------------------------

def run(models, smoke_config, method: str, robust: dict | None = None, **cap):
    cfg = smoke_config(model={"dtype": "fp64", "resolution": RES},
                       attack={**METHOD_STEPS[method], "robust": robust or {}},
                       cap={"ratio_max": 4, "start_fraction": 0.0, **cap})
    return protect_group(mixed_group(0), cfg, identity=f"robust-{method}", models=models)


def digest(result) -> str:
    """sha256 of the published pixels, channel-major (the byte order the pinned digests were taken in)."""
    pixels = [to_uint8(img).transpose(2, 0, 1).tobytes() for img in result.images]
    return hashlib.sha256(b"".join(pixels)).hexdigest()[:16]


# `run(..., robust=None)` with the code before `attack.robust` existed (commit 88903d7), fp64 on the CPU
PIXELS_BEFORE_ROBUST = {"fsmg": "3ccdbdc053958c28", "aspl": "5db9aa579866467f", "simac": "41da47200756552e"}


@pytest.mark.parametrize("method", ["fsmg", "aspl", "simac"])
def test_off_gives_the_pixels_of_before(fp64_models, smoke_config, method):
    plain = run(fp64_models, smoke_config, method)
    assert digest(plain) == PIXELS_BEFORE_ROBUST[method]
    # on, with every transform left out of every draw: the same pixels through the transformed path
    never = run(fp64_models, smoke_config, method, robust={**ON, "probability": 0.0})
    assert_same(plain, never)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method,score_draw,samples", [
    ("fsmg", "fresh", 1), ("fsmg", "gradient", 2), pytest.param("fsmg", "independent", 1, marks=SLOW),
    pytest.param("aspl", "fresh", 2, marks=SLOW), pytest.param("simac", "fresh", 1, marks=SLOW),
])
def test_fast_equals_reference_under_robust(fp64_models, smoke_config, method, score_draw, samples):
    robust = {**ON, "samples": samples, "probability": 0.7, "crop_scale": [0.8, 1.0], "flip": True}  # every link
    fast, ref = (run(fp64_models, smoke_config, method, robust=robust, search=s, score_draw=score_draw)
                 for s in ("fast", "reference"))
    assert_same(fast, ref)


@pytest.mark.slow
def test_simac_feature_loss_under_robust(fp64_models, smoke_config):
    robust = {**ON, "probability": 0.7}
    attack = {**METHOD_STEPS["simac"], "robust": robust, "simac": {"feature_detach": False}}
    cfg = smoke_config(model={"dtype": "fp64", "resolution": RES}, attack=attack,
                       cap={"ratio_max": 4, "start_fraction": 0.0})
    out = [protect_group(mixed_group(0), cfg.model_copy(update={"cap": cfg.cap.model_copy(update={"search": s})}),
                         identity="simac-features", models=fp64_models) for s in ("fast", "reference")]
    assert_same(*out)


@pytest.mark.parametrize("cap", [True, False], ids=["with-cap", "without-cap"])
def test_robust_changes_the_perturbation_on_real_photos(tiny_models, smoke_config, faces_dir, cap):
    """Same seed and draws of noise; only the transforms differ: the photos differ, both within ε, and a
    second run gives the same pixels — with CAP and for the baseline alone."""
    photos = load_faces(faces_dir, 64)[:3]
    eps = 0.05

    def protect(robust: dict):
        cfg = smoke_config(attack={**METHOD_STEPS["fsmg"], "pgd_steps": 4, "eps": eps, "robust": robust},
                           cap={"ratio_max": 4, "enabled": cap})
        return protect_group(photos, cfg, identity="face", models=tiny_models)

    plain, robust, again = protect({}), protect(ON), protect(ON)
    assert all(torch.equal(a, b) for a, b in zip(robust.images, again.images))
    changed = [float((a - b).abs().max()) for a, b in zip(plain.images, robust.images)]
    assert all(c > 0 for c in changed)
    for result in (plain, robust):
        assert all(float((p - c).abs().max()) <= eps + 1e-6 for p, c in zip(result.images, photos))


@pytest.mark.slow
def test_the_robustness_benchmark_prints_its_result_line(capray_cache):
    """benchmarks/robustness.py at a toy size: its contract line parses and every photo stayed within ε."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "robustness.py"), "--photos", "2", "--size", "32", "--steps", "4",
         "--train-steps", "2", "--draws", "2"],
        cwd=root, env=dict(os.environ, CAPRAY_CACHE=str(capray_cache)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"RESULT robustness retained_plain=(\S+) retained_robust=(\S+) ratio=(\S+) linf_ok=([01])",
                         last)
    assert match, last
    assert match.group(4) == "1"
