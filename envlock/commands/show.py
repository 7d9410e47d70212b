"""`envlock show`: read a sidecar back (strictly) and hand its manifest over for rendering."""

from __future__ import annotations

import os

from envlock.commands.results import ShowResult
from envlock.sidecar.store import read_sidecar


def show(model: str | os.PathLike[str]) -> ShowResult:
    sc = read_sidecar(model)
    # What the rendering reads: refused with exit 2 (naming the field) rather than a KeyError.
    sc.require("framework", "cuda", "determinism", "weights", "probe", "packages.count")
    return ShowResult(sidecar=sc.path, manifest=sc.manifest)
