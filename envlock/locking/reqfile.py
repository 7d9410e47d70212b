"""The one reader of requirements files (pip's format, as ``requirements.lock.txt`` holds it).

Logical lines follow pip's rules (``\\`` continues a line, ``#`` after a blank starts a
comment). A requirement line is the requirement, then its per-requirement options
(``--hash=...``, ``--config-settings ...``); lines that start with ``-`` are file options.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion

HASH_RE = re.compile(r"--hash[=\s]+(\S+)")

# Installed with or around a locked environment (the installers, envlock itself), but never
# imported by what the model computes: left out when an environment is compared with its lock.
NOT_RUNTIME = frozenset({"envlock", "pip", "setuptools", "wheel", "uv"})


def logical_lines(text: str) -> Iterator[str]:
    """Requirement-file lines with continuations joined, comments dropped and blanks squeezed."""
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            yield " ".join(line.split())
    if pending.strip():
        yield " ".join(pending.split())


def locked_requirements(requirements_text: str) -> Iterator[tuple[Requirement, str]]:
    """Each requirement of a lock file with its whole logical line (file options, comments and
    lines that are not a requirement skipped)."""
    for line in logical_lines(requirements_text):
        if line.startswith("-"):
            continue
        try:
            yield Requirement(line.partition(" --")[0].strip()), line
        except InvalidRequirement:
            continue


def locked_pins(requirements_text: str) -> dict[str, str]:
    """``{canonical name: version}`` for every ``name==version`` line (markers not evaluated)."""
    pins: dict[str, str] = {}
    for req, _ in locked_requirements(requirements_text):
        exact = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if exact:
            pins[str(canonicalize_name(req.name))] = exact[0]
    return pins


def all_hashed(requirements_text: str) -> bool:
    """True when every requirement line carries at least one ``--hash``."""
    reqs = [ln for ln in logical_lines(requirements_text) if not ln.startswith("-")]
    return bool(reqs) and all(HASH_RE.search(ln) for ln in reqs)


def read_requirements(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, version, hashes) for each requirement. Hashes keep their algorithm prefix
    (``sha256:...``). For a direct reference (``name @ url``) the version comes from the file
    name in the URL, or is ``""``; so it is for a requirement that pins no single version."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for req, line in locked_requirements(text):
        pins = [s for s in req.specifier if s.operator in ("==", "===")]
        version = pins[0].version if len(pins) == 1 else _version_from_url(req.url) if req.url else ""
        out.append((str(canonicalize_name(req.name)), version, tuple(HASH_RE.findall(line))))
    return out


def _version_from_url(url: str) -> str:
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        return str(parse_sdist_filename(filename)[1])
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return ""


__all__ = ["HASH_RE", "all_hashed", "locked_pins", "locked_requirements", "logical_lines",
           "read_requirements"]
