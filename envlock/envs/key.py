"""The environment cache's key: which locked environments are the same one.

Two requirement files that install the same thing (names canonicalised, versions normalised,
hashes sorted; comments, order, whitespace and options that only name a package source
ignored), for the same Python version and platform, get the same key, so they share one
environment. :class:`EnvSpec` is what to build under a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from envlock.locking.reqfile import HASH_RE, all_hashed, logical_lines

LOCK_KEY_SCHEMA = 1
# Options that only say where files come from: with hashes they do not change what is installed.
_SOURCE_OPTIONS = ("--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--trusted-host",
                   "--no-index", "--prefer-binary", "--pre")


def _canonical_requirement(line: str) -> str:
    hashes = sorted(h.lower() for h in HASH_RE.findall(line))
    body = HASH_RE.sub("", line).strip()
    try:
        req = Requirement(body)
    except InvalidRequirement:
        return f"raw:{body}|{','.join(hashes)}"
    specs = []
    for spec in req.specifier:
        version = spec.version
        if spec.operator == "==" and "*" not in version:
            with contextlib.suppress(InvalidVersion):
                version = str(Version(version))
        specs.append(f"{spec.operator}{version}")
    extras = ",".join(sorted(canonicalize_name(e) for e in req.extras))
    return "|".join([
        str(canonicalize_name(req.name)), extras, ",".join(sorted(specs)), req.url or "",
        str(req.marker or ""), ",".join(hashes),
    ])


def canonical_lock(requirements_text: str) -> list[str]:
    """The lock as a sorted list of normalised entries: what the key is computed from.

    Names are canonicalised, versions normalised, hashes sorted; comments, whitespace, order
    and options that only name a package source are ignored.
    """
    entries: set[str] = set()
    for line in logical_lines(requirements_text):
        if line.startswith("-"):
            if line.split()[0].split("=")[0] in _SOURCE_OPTIONS:
                continue
            entries.add(f"option:{line}")
        else:
            entries.add(_canonical_requirement(line))
    return sorted(entries)


def lock_key(requirements_text: str, python_version: str, platform_tag: str) -> str:
    """sha256 (hex) of the canonical lock, the Python version and the platform."""
    doc = {
        "schema": LOCK_KEY_SCHEMA,
        "python": python_version,
        "platform": platform_tag,
        "requirements": canonical_lock(requirements_text),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_platform_tag() -> str:
    """This machine's platform for the key, e.g. ``linux-x86_64``."""
    return sysconfig.get_platform()



@dataclass(frozen=True)
class EnvSpec:
    """What to build. Make one with :meth:`from_lock` unless the key is already known."""

    key: str
    requirements_path: Path
    python_version: str
    require_hashes: bool = True
    find_links: tuple[str, ...] = ()  # local folders or URLs (e.g. a sidecar's wheels/)
    no_index: bool = False
    offline: bool | None = None  # None: Settings.offline
    allow_python_download: bool = False

    @classmethod
    def from_lock(
        cls,
        requirements_path: Path,
        python_version: str,
        *,
        platform_tag: str | None = None,
        find_links: Sequence[Path | str] = (),
        no_index: bool = False,
        offline: bool | None = None,
        allow_python_download: bool = False,
    ) -> EnvSpec:
        text = Path(requirements_path).read_text(encoding="utf-8")
        return cls(
            key=lock_key(text, python_version, platform_tag or default_platform_tag()),
            requirements_path=Path(requirements_path).absolute(),
            python_version=python_version,
            require_hashes=all_hashed(text),
            find_links=tuple(
                str(p) if "://" in str(p) else str(Path(p).absolute()) for p in find_links
            ),
            no_index=no_index,
            offline=offline,
            allow_python_download=allow_python_download,
        )


__all__ = ["LOCK_KEY_SCHEMA", "EnvSpec", "canonical_lock", "default_platform_tag", "lock_key"]
