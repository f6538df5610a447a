"""capray: CAP (Cross-image Anti-Personalization) as a Ray-distributed protection service."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "protect_group", "load_models", "load_config", "CaprayConfig"]


def __getattr__(name: str):  # keep `import capray` light: torch/diffusers load on first use
    if name in ("protect_group", "load_models"):
        from capray.attack import engine

        return getattr(engine, name)
    if name in ("load_config", "CaprayConfig"):
        from capray import config

        return getattr(config, name)
    raise AttributeError(name)
