"""envlock: make a saved Keras/TensorFlow model reproducible months later, on another machine."""

from __future__ import annotations

__version__ = "0.1.0"
