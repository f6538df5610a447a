"""`capray.Protector`, the public Python API: every kind of photo in, the engine's pixels out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

FAST = {"attack": {"method": "fsmg", "pgd_steps": 2, "fsmg_train_steps": 0}, "cap": {"ratio_max": 3}}


@pytest.fixture(scope="module")
def protector(tiny_model_dir):
    from capray import Protector

    return Protector.from_pretrained("tiny", config=FAST, preset="smoke")


def _photo(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_arrays_pil_images_and_paths_give_the_engines_pixels(protector, tmp_path):
    from capray.attack.api import protect_arrays

    arrays = [_photo(0), _photo(1, 28, 24)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    engine, record = protect_arrays(arrays, protector.config, "alice", protector.models)
    for photos in (arrays, [Image.fromarray(a) for a in arrays], paths, [str(p) for p in paths]):
        result = protector(photos, identity="alice")
        assert all(np.array_equal(x, y) for x, y in zip(result.arrays, engine))
        assert [im.size for im in result.images] == [(a.shape[1], a.shape[0]) for a in arrays]
        assert result.record.lambda_schedule == record.lambda_schedule and result.record.identity == "alice"
    eps_255 = protector.config.attack.eps * 127.5
    assert all(np.abs(x.astype(int) - a).max() <= np.ceil(eps_255) for x, a in zip(engine, arrays))
    assert not np.array_equal(protector(arrays, identity="bob").arrays[0], engine[0])  # identity seeds the draws


def test_exif_orientation_is_applied_and_alpha_comes_back_unchanged(protector):
    base = _photo(2, 20, 30)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(base).save(rotated, format="JPEG", quality=95, exif=exif.tobytes())
    alpha = np.random.default_rng(3).integers(0, 256, (22, 18), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([_photo(4, 22, 18), alpha]))
    result = protector([Image.open(rotated), rgba])
    assert result.images[0].size == (20, 30)  # displayed: 20 wide, 30 high
    assert result.images[1].mode == "RGBA" and np.array_equal(np.array(result.images[1])[..., 3], alpha)
    assert result.arrays[1].shape == (22, 18, 3)


def test_bad_photos_and_a_config_for_other_models_are_refused(protector):
    from capray.io.images import BadImage

    with pytest.raises(BadImage, match="uint8"):
        protector([_photo(0).astype(np.float32)])
    with pytest.raises(TypeError, match="PIL image"):
        protector([b"not a photo"])
    other = protector.config.model_copy(update={"model": protector.config.model.model_copy(update={"resolution": 32})})
    with pytest.raises(ValueError, match="different models"):
        protector([_photo(0)], config=other)


def test_config_accepts_overrides_a_file_or_a_config(tmp_path):
    from capray.config import load_config
    from capray.protector import as_config

    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  eps: 0.03\n")
    assert as_config(str(path), model="tiny").attack.eps == 0.03
    assert as_config(str(path), model="tiny").model.sd == "tiny"
    assert as_config({"seed": 7}, preset="smoke").seed == 7
    cfg = load_config(preset="smoke")
    assert as_config(cfg) is cfg and as_config(cfg, model="other/sd").model.sd == "other/sd"
