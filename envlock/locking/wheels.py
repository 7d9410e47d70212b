"""Which file of a locked distribution is the one installed here: the one choice that
`save --vendor` (the sidecar's ``wheels/``) and the conda lock's pip part both make.

A wheel's ``.dist-info/WHEEL`` keeps the tags of the wheel it was installed from, and the index
file with exactly that tag set is that wheel. Only the exact set identifies a file: two wheels
of one release can share a tag (``manylinux2014`` in both a ``manylinux_2_17.manylinux2014``
and a ``manylinux2014`` build), so "any shared tag" could name the wrong bytes. Failing an
exact match (a distribution built here from its sdist), the wheel this interpreter prefers, in
``packaging.tags.sys_tags()`` order, then the sdist (a ``.tar.gz`` before other archives).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from packaging.tags import Tag, parse_tag
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from envlock.index.lookup import DistFile


def installed_tags(dist_info: str | os.PathLike[str] | None) -> frozenset[Tag]:
    """The tags of the wheel a distribution was installed from (empty when unknown)."""
    if not dist_info:
        return frozenset()
    try:
        text = (Path(dist_info) / "WHEEL").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    tags: set[Tag] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "tag" and value.strip():
            with contextlib.suppress(ValueError):
                tags |= parse_tag(value.strip())
    return frozenset(tags)


def _wheel_tags(filename: str) -> frozenset[Tag] | None:
    try:
        return parse_wheel_filename(filename)[3]
    except InvalidWheelFilename:
        return None


def choose_file(files: Sequence[DistFile], installed: frozenset[Tag],
                supported: Sequence[Tag]) -> DistFile | None:
    """The file of ``files`` that was (or would be) installed here; None when none fits."""
    wheels = [(f, t) for f in files if f.is_wheel and (t := _wheel_tags(f.filename)) is not None]
    if installed:
        exact = [f for f, t in wheels if t == installed]
        if exact:
            return exact[0]
    rank = {tag: i for i, tag in enumerate(supported)}
    fitting = [(min(rank[x] for x in t if x in rank), f) for f, t in wheels if any(x in rank for x in t)]
    if fitting:
        return min(fitting, key=lambda rf: (rf[0], rf[1].filename))[1]
    sdists = sorted((f for f in files if not f.is_wheel),
                    key=lambda f: (not f.filename.endswith(".tar.gz"), f.filename))
    return sdists[0] if sdists else None


__all__ = ["choose_file", "installed_tags"]
