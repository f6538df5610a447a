"""The paper's metrics on generated images, each tagged with the backend that computed it.

- FDFR: share of generated images where the detector finds no face (↑ = better protection).
- ISM: cosine of the largest face's embedding to the mean embedding of the identity's clean photos,
  0 for images without a face (CAP §5), averaged over all images (↓ = better protection).
- SER-FIQ: face-image quality of the detected faces (↓).  BRISQUE: naturalness, higher = worse (↑).
- CLIP-IQA: CLIP's "good photo" probability (↓).
A metric whose backend cannot run has value None and a reason; nothing is ever made up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from capray.config import EvaluateConfig
from capray.evaluate.faces import BackendUnavailable, largest, load_face_backend
from capray.evaluate.quality import BrisqueBackend, load_clip_iqa

METRICS = ("FDFR", "ISM", "SER-FIQ", "BRISQUE", "CLIP-IQA")
# +1: higher means stronger protection; -1: lower means stronger protection (the paper's arrows)
DIRECTION = {"FDFR": +1, "ISM": -1, "SER-FIQ": -1, "BRISQUE": +1, "CLIP-IQA": -1}


@dataclass
class Backend:
    """A loaded backend, or the reason it is unavailable."""

    name: str
    impl: Any = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.impl is not None


def value(v: float | None, backend: str, reason: str | None = None, n: int | None = None) -> dict[str, Any]:
    return {"value": None if v is None else float(v), "backend": backend, "reason": reason, "n": n}


class MetricSuite:
    """All metric backends for one worker, loaded once."""

    def __init__(self, ev: EvaluateConfig):
        self.notes: list[str] = []
        try:
            face, notes = load_face_backend(ev.face_backend, ev.insightface_root, ev.serfiq_passes)
            self.notes += notes
            self.face = Backend(face.identity_name, face)
            self.detector_name, self.identity_name = face.detector_name, face.identity_name
            self.quality_name = face.quality_name
        except BackendUnavailable as exc:
            self.face = Backend("face", None, str(exc))
            self.detector_name = self.identity_name = self.quality_name = "unavailable"
        try:
            self.brisque = Backend("brisque", BrisqueBackend())
        except BackendUnavailable as exc:
            self.brisque = Backend("brisque", None, str(exc))
        try:
            clip = load_clip_iqa(ev.clip_iqa_weights)
            self.clip = Backend(f"CLIP-IQA ({clip.weights})", clip)
        except BackendUnavailable as exc:
            self.clip = Backend("CLIP-IQA", None, str(exc))

    def backends(self) -> dict[str, str]:
        """metric → the backend that computes it, or 'unavailable: why'."""
        face = (lambda n: n) if self.face.ok else (lambda n: f"unavailable: {self.face.reason}")
        return {
            "FDFR": face(self.detector_name),
            "ISM": face(self.identity_name),
            "SER-FIQ": face(self.quality_name),
            "BRISQUE": "brisque (LIVE SVM)" if self.brisque.ok else f"unavailable: {self.brisque.reason}",
            "CLIP-IQA": self.clip.name if self.clip.ok else f"unavailable: {self.clip.reason}",
        }

    def reference_embedding(self, clean_photos: list[np.ndarray]) -> tuple[np.ndarray | None, int]:
        """Mean embedding of the clean photos with a detected face (photos without one are skipped)."""
        if not self.face.ok:
            return None, 0
        embs = []
        for rgb in clean_photos:
            face = largest(self.face.impl.detect(rgb))
            if face is not None:
                embs.append(self.face.impl.embed(rgb, face))
        if not embs:
            return None, 0
        return np.mean(embs, axis=0), len(embs)

    def score(self, images: list[np.ndarray], reference: np.ndarray | None, seed: int = 0) -> dict[str, dict]:
        names = self.backends()
        out: dict[str, dict] = {}
        n = len(images)
        if not self.face.ok:
            for m in ("FDFR", "ISM", "SER-FIQ"):
                out[m] = value(None, names[m], self.face.reason)
        else:
            impl = self.face.impl
            sims, quals, failures, qual_reason = [], [], 0, None
            for i, rgb in enumerate(images):
                face = largest(impl.detect(rgb))
                if face is None:
                    failures += 1
                    sims.append(0.0)  # CAP §5: ISM is 0 where no face is detected
                    continue
                if reference is not None:
                    emb = impl.embed(rgb, face)
                    sims.append(float(emb @ reference / np.linalg.norm(reference)))
                if qual_reason is None:
                    try:
                        quals.append(impl.serfiq(rgb, face, seed=seed + i))
                    except BackendUnavailable as exc:
                        qual_reason = str(exc)
            out["FDFR"] = value(failures / n if n else None, names["FDFR"], None if n else "no images", n)
            if reference is None:
                out["ISM"] = value(None, names["ISM"], "no face detected in the clean photos", n)
            else:
                out["ISM"] = value(float(np.mean(sims)) if n else None, names["ISM"], None, n)
            if qual_reason is not None:
                out["SER-FIQ"] = value(None, names["SER-FIQ"], qual_reason)
            elif not quals:
                out["SER-FIQ"] = value(None, names["SER-FIQ"], "no face detected", 0)
            else:
                out["SER-FIQ"] = value(float(np.mean(quals)), names["SER-FIQ"], None, len(quals))
        for key, backend in (("BRISQUE", self.brisque), ("CLIP-IQA", self.clip)):
            if not backend.ok:
                out[key] = value(None, names[key], backend.reason)
            else:
                out[key] = value(float(np.mean([backend.impl.score(rgb) for rgb in images])), names[key], None, n)
        return out
