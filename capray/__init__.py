"""capray: CAP (Cross-image Anti-Personalization) as a Ray-distributed protection service."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Protector", "ProtectedPhotos", "ProtectionRecord", "load_config", "CaprayConfig",
           "protect_group", "load_models"]


def __getattr__(name: str):  # keep `import capray` light: torch/diffusers load on first use
    if name in ("Protector", "ProtectedPhotos"):
        from capray import protector

        return getattr(protector, name)
    if name == "ProtectionRecord":
        from capray.attack.api import ProtectionRecord

        return ProtectionRecord
    if name in ("protect_group", "load_models"):  # the engine's tensor-level call, for research use
        from capray.attack import engine

        return getattr(engine, name)
    if name in ("load_config", "CaprayConfig"):
        from capray import config

        return getattr(config, name)
    raise AttributeError(name)
