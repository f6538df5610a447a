"""`capray evaluate`: the attacker's view (DreamBooth on clean vs protected photos, metrics, report)."""

from __future__ import annotations


def __getattr__(name: str):  # keep the CLI's import light: torch/diffusers load on first use
    if name == "evaluate":
        from capray.evaluate.pipeline import evaluate

        return evaluate
    raise AttributeError(name)
