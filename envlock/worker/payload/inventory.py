"""Enumerate the distributions installed on a path, from their metadata (not ``pip freeze``).

Standard library only and Python 3.8+: the host imports it, and it also runs as a plain
script under other interpreters, where envlock itself is not installed::

    python inventory.py [--path DIR ...]      # prints a JSON list on stdout

Each entry is a plain dict (JSON-ready, so the script and the import give the same thing):
``name`` (PEP 503 canonical), ``version``, ``installer``, ``requested``, ``direct_url``
(PEP 610, parsed), ``kind``, ``requires``, ``location`` and ``dist_info``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from typing import Any, Dict, Iterable, List, Optional

_CANONICAL_RE = re.compile(r"[-_.]+")


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, spelt out so that this file needs no ``packaging``."""
    return _CANONICAL_RE.sub("-", name).lower()


def kind_of(direct_url: Optional[Dict[str, Any]]) -> str:
    """Where a distribution came from, by PEP 610: what decides whether it can be hash-locked.

    ``index``: no direct_url.json, so an installer picked it from an index by name.
    ``editable`` / ``local``: a directory on this machine. ``vcs``: a checkout of a VCS URL.
    ``local`` also covers an archive file on this machine (file:// URL), which another
    machine cannot fetch; ``archive``: an archive downloaded from a remote URL.
    """
    if not direct_url:
        return "index"
    dir_info = direct_url.get("dir_info")
    if isinstance(dir_info, dict):
        return "editable" if dir_info.get("editable") else "local"
    if "vcs_info" in direct_url:
        return "vcs"
    if "archive_info" in direct_url:
        url = str(direct_url.get("url", ""))
        return "local" if url.startswith("file:") else "archive"
    # An unknown PEP 610 variant: it is a direct reference of some sort, never an index pick.
    return "local"


def _read_text(dist: metadata.Distribution, name: str) -> Optional[str]:
    try:
        return dist.read_text(name)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _direct_url(dist: metadata.Distribution) -> Optional[Dict[str, Any]]:
    text = _read_text(dist, "direct_url.json")
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(dist: metadata.Distribution) -> Optional[Dict[str, Any]]:
    try:
        meta = dist.metadata
        # get_all, not [...]: a missing key is None on 3.8 but a warning (later an error) on 3.12+.
        name = (meta.get_all("Name") or [None])[0] if meta is not None else None
        version = (meta.get_all("Version") or [None])[0] if meta is not None else None
    except Exception:  # any broken metadata (an empty folder, bad encoding): skip, as pip does
        return None
    if not name or not version:
        return None
    # PathDistribution keeps its folder in ``_path`` on every Python from 3.8 on (pip relies
    # on it too); nothing public gives the .dist-info folder itself.
    info_path = getattr(dist, "_path", None)
    try:
        location = str(dist.locate_file(""))
    except (OSError, NotImplementedError, TypeError):
        location = str(info_path.parent) if info_path is not None else ""
    installer = _read_text(dist, "INSTALLER")
    direct_url = _direct_url(dist)
    try:
        requires = list(dist.requires or [])
    except (OSError, UnicodeDecodeError, ValueError):
        requires = []
    return {
        "name": canonical_name(str(name)),
        "version": str(version).strip(),
        "installer": (installer.strip() or None) if installer is not None else None,
        "requested": _read_text(dist, "REQUESTED") is not None,
        "direct_url": direct_url,
        "kind": kind_of(direct_url),
        "requires": requires,
        "location": location,
        "dist_info": str(info_path) if info_path is not None else None,
    }


def installed(paths: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Every distribution importable from ``paths`` (default ``sys.path``), sorted by name.

    When a name appears more than once, the first one on the path wins, as it does for
    ``import``; a shadowed copy (say a user-site numpy under the venv's) is not reported.
    Distributions whose metadata has no name or version are skipped.
    """
    # Absolute, so that the paths reported still mean something to a host in another cwd.
    search = [os.path.abspath(str(p) or ".") for p in (sys.path if paths is None else paths)]
    seen: Dict[str, Dict[str, Any]] = {}
    for entry in search:
        # One path entry at a time keeps the path order explicit; within one folder the
        # order is made stable by sorting, since a folder listing has none.
        try:
            found = list(metadata.distributions(path=[entry]))
        except (OSError, ValueError):
            continue
        found.sort(key=lambda d: str(getattr(d, "_path", "")))
        for dist in found:
            described = _describe(dist)
            if described is not None and described["name"] not in seen:
                seen[described["name"]] = described
    return [seen[name] for name in sorted(seen)]


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths: List[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--path" and args:
            paths.append(args.pop(0))
        elif arg.startswith("--path="):
            paths.append(arg[len("--path="):])
        else:
            sys.stderr.write("usage: inventory.py [--path DIR ...]\n")
            return 2
    # Run as a script, sys.path[0] is this file's folder: it holds no distributions of the
    # target environment, and a stray one there must not shadow the real ones.
    default = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    result = installed(paths or default)
    sys.stdout.write(json.dumps(result, sort_keys=True))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
