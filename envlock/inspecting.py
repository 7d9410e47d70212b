"""`envlock show`: read a sidecar back (strictly) and hand its manifest over for rendering."""

from __future__ import annotations

import os

from envlock.results import ShowResult
from envlock.sidecar import read_sidecar


def show(model: str | os.PathLike[str]) -> ShowResult:
    sc = read_sidecar(model)
    return ShowResult(sidecar=sc.path, manifest=sc.manifest)
