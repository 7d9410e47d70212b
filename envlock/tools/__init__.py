"""The external tools envlock drives through their command lines: uv, pip, conda, rattler, nvidia-smi."""

from __future__ import annotations

import os


def exe_name(name: str) -> str:
    """A program's file name on this OS (``uv`` here, ``uv.exe`` on Windows)."""
    return name + ".exe" if os.name == "nt" else name
