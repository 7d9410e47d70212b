"""envlock: make a saved Keras/TensorFlow model reproducible months later, on another machine."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["__version__", "load", "lock", "prewarm", "run", "save"]

_API = {"save": "envlock.saving", "lock": "envlock.saving", "prewarm": "envlock.saving",
        "load": "envlock.running", "run": "envlock.running"}


def __getattr__(name: str) -> Any:
    # Lazy: `import envlock` must stay cheap (the worker and the CLI import parts of it).
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'envlock' has no attribute {name!r}")
