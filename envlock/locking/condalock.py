"""``conda-lock.yml`` from a conda environment's ``conda-meta/``, and what is rendered from it.

**Capture.** A conda environment records every package it holds in ``conda-meta/*.json``
(url, md5, sha256, depends, channel, the files it installed): that *is* the solution, so no
solver is run. Distributions that pip (or uv) installed on top are told apart by ownership: a
``.dist-info`` folder listed in a conda record's ``files`` is conda's, anything else on the
interpreter's path is pip's and goes in as a ``manager: pip`` entry with the sha256 of the
wheel that was installed (:mod:`envlock.locking.wheels`: the choice ``save --vendor`` makes too).

**Format.** conda-lock's unified lock file, version 1 (``conda_lock/lockfile/v1/models.py``:
``version``, ``metadata`` with ``content_hash``, ``channels``, ``platforms``, ``sources``, and one
``package`` entry per package and platform). That model forbids extra keys, and it has no room
for what conda-lock gets back from the archive at install time (``noarch``, ``build_number``,
``constrains``, timestamps); a rebuild without conda needs those, so they travel in the
manifest's ``conda.records`` (keyed by file name), which the sidecar's integrity check covers
like the lock file itself.

**YAML without a YAML library** (:mod:`envlock.locking.condayaml`): a small writer and a reader for
the subset it writes. What is rendered from the lock is in :mod:`envlock.locking.condarender`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from packaging.markers import InvalidMarker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, sys_tags
from packaging.utils import canonicalize_name

from envlock.errors import SidecarError
from envlock.locking.condayaml import dump_yaml, load_yaml
from envlock.locking.lockfiles import LockedPackage
from envlock.locking.wheels import choose_file, installed_tags

LOCKFILE = "conda-lock.yml"
LOCK_VERSION = 1
# Fields of a conda-meta record that describe this installation, not the package.
_INSTALL_FIELDS = frozenset({
    "files", "paths_data", "link", "extracted_package_dir", "package_tarball_full_path",
    "requested_spec", "requested_specs", "installed_system_menus", "auth", "preferred_env",
})
_ANACONDA_ORG = "https://conda.anaconda.org/"
_SUBDIRS = frozenset({
    "noarch", "linux-64", "linux-32", "linux-aarch64", "linux-armv6l", "linux-armv7l",
    "linux-ppc64le", "linux-ppc64", "linux-s390x", "linux-riscv64", "osx-64", "osx-arm64",
    "win-64", "win-32", "win-arm64", "zos-z", "emscripten-wasm32", "wasi-wasm32",
})


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CondaPackage:
    """One conda package as locked. ``record`` holds the package's index fields (what
    ``info/index.json`` and the channel's repodata say), enough to install it without conda."""

    name: str
    version: str
    build: str
    url: str
    md5: str
    sha256: str | None
    depends: tuple[str, ...]
    record: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def fn(self) -> str:
        return str(self.record.get("fn") or _basename(self.url))

    @property
    def subdir(self) -> str:
        return str(self.record.get("subdir") or _subdir_of(self.url))


@dataclass(frozen=True)
class PipPackage:
    """One distribution that pip installed on top of the conda packages."""

    name: str
    version: str
    url: str
    sha256: str | None
    dependencies: Mapping[str, str] = field(compare=False)


@dataclass(frozen=True)
class CondaLock:
    platform: str
    channels: tuple[str, ...]
    conda: tuple[CondaPackage, ...]
    pip: tuple[PipPackage, ...]

    @property
    def python(self) -> CondaPackage | None:
        return next((p for p in self.conda if p.name == "python"), None)

    def content_hash(self) -> str:
        """sha256 of what the lock pins (not of how it is written)."""
        rows = sorted(
            [["conda", p.name, p.version, p.build, p.url, p.md5, p.sha256 or ""] for p in self.conda]
            + [["pip", p.name, p.version, "", p.url, "", p.sha256 or ""] for p in self.pip]
        )
        doc = {"platform": self.platform, "channels": list(self.channels), "packages": rows}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CondaCapture:
    """What ``envlock save`` writes for a conda environment: the file and the manifest section."""

    lock: CondaLock
    text: str
    manifest: dict[str, Any]
    warnings: tuple[str, ...] = ()


# --- platform --------------------------------------------------------------------------------


def this_platform() -> str:
    """conda's name for this machine's platform (``linux-64``, ``osx-arm64``, ``win-64``, ...)."""
    machine = _platform.machine().lower()
    if sys.platform.startswith("linux"):
        system = "linux"
    elif sys.platform == "darwin":
        system = "osx"
    elif sys.platform in ("win32", "cygwin"):
        system = "win"
    else:
        system = sys.platform
    if machine in ("x86_64", "amd64"):
        arch = "64"
    elif machine in ("i386", "i686", "x86"):
        arch = "32"
    elif machine in ("arm64", "aarch64"):
        arch = "aarch64" if system == "linux" else "arm64"
    else:
        arch = machine  # ppc64le, s390x, armv7l, riscv64: conda uses the machine name
    return f"{system}-{arch}"


def is_conda_prefix(prefix: Path) -> bool:
    return (prefix / "conda-meta").is_dir()


# --- small helpers ---------------------------------------------------------------------------


def _basename(url: str) -> str:
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def _subdir_of(url: str) -> str:
    parts = urlsplit(url).path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] in _SUBDIRS else ""


def _channel_name(channel: str) -> str:
    """A record's channel as conda-lock names it: ``conda-forge`` for anaconda.org channels,
    the URL (without a trailing subdir) for any other."""
    text = channel.rstrip("/")
    head, _, last = text.rpartition("/")
    if head and last in _SUBDIRS:
        text = head
    if text.startswith(_ANACONDA_ORG):
        return text[len(_ANACONDA_ORG):]
    return text


def _spec_dict(specs: Iterable[str]) -> dict[str, str]:
    """conda match specs (``libzlib >=1.2.13,<2``) as conda-lock's ``{name: spec}``."""
    out: dict[str, str] = {}
    for spec in specs:
        name, _, rest = spec.strip().partition(" ")
        rest = rest.strip() or "*"
        out[name] = f"{out[name]},{rest}" if name in out and out[name] != "*" else rest
    return out


# --- capture ---------------------------------------------------------------------------------


def read_conda_meta(prefix: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records in ``prefix/conda-meta`` that can be locked, sorted by name, and what was
    left out and why (an unreadable file; a record with no URL, which no installer can fetch
    again): the caller says so, since a rebuild will not hold those."""
    records: list[dict[str, Any]] = []
    left_out: list[str] = []
    for path in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            left_out.append(f"conda-meta/{path.name} is not readable ({type(exc).__name__})")
            continue
        if not isinstance(doc, dict) or not doc.get("name"):
            left_out.append(f"conda-meta/{path.name} is not a conda record")
        elif not doc.get("url") or not doc.get("md5"):
            left_out.append(f"conda package {doc['name']} {doc.get('version')} has no "
                            f"{'url' if not doc.get('url') else 'md5'} in conda-meta")
        else:
            records.append(doc)
    return sorted(records, key=lambda r: str(r["name"])), left_out


def owned_dist_infos(records: Iterable[Mapping[str, Any]]) -> set[str]:
    """The ``.dist-info`` / ``.egg-info`` folders (prefix-relative, POSIX) that conda records list."""
    owned: set[str] = set()
    for rec in records:
        for f in rec.get("files") or ():
            parts = PurePosixPath(str(f).replace("\\", "/")).parts
            for i, part in enumerate(parts):
                if part.endswith((".dist-info", ".egg-info")):
                    owned.add("/".join(parts[: i + 1]))
                    break
    return owned


def _relative(path: str, prefix: Path) -> str | None:
    try:
        return Path(os.path.realpath(path)).relative_to(os.path.realpath(prefix)).as_posix()
    except ValueError:
        return None


def _pip_dependencies(requires: Iterable[str]) -> dict[str, str]:
    deps: dict[str, str] = {}
    for text in requires:
        try:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
        except (InvalidRequirement, InvalidMarker, ValueError, TypeError, KeyError):
            continue
        deps[str(canonicalize_name(req.name))] = str(req.specifier) or "*"
    return deps


def capture(prefix: Path, dists: Sequence[Mapping[str, Any]], packages: Sequence[LockedPackage], *,
            platform: str | None = None, supported: Sequence[Tag] | None = None) -> CondaCapture:
    """Lock the conda environment at ``prefix``: its conda records, and the distributions
    pip installed on top (from ``dists``, the inventory, and ``packages``, their hashes; the
    file of each as :func:`envlock.locking.wheels.choose_file` picks it for ``supported``, this
    interpreter's tags by default)."""
    supported = list(sys_tags()) if supported is None else list(supported)
    records, left_out = read_conda_meta(prefix)
    subdirs = [str(r.get("subdir")) for r in records if r.get("subdir") not in (None, "", "noarch")]
    plat = platform or (max(set(subdirs), key=subdirs.count) if subdirs else this_platform())
    conda, channels, extra = _conda_packages(records)
    pip, conda_owned, not_locked = _pip_packages(prefix, dists, packages, owned_dist_infos(records),
                                                 supported)
    lock = CondaLock(platform=plat, channels=tuple(channels), conda=tuple(conda),
                     pip=tuple(sorted(pip, key=lambda p: p.name)))
    python = lock.python
    manifest = {
        "lockfile": LOCKFILE,
        "platform": plat,
        "channels": list(channels),
        "python": ({"name": python.name, "version": python.version, "build": python.build,
                    "url": python.url} if python else None),
        "conda_packages": len(conda),
        "pip_packages": len(pip),
        "conda_owned_distributions": sorted(conda_owned),
        "pip_not_locked": sorted(not_locked),
        "conda_not_locked": left_out,
        "content_hash": lock.content_hash(),
        "records": extra,
    }
    warnings = [f"{what}: left out of {LOCKFILE}, a rebuild will not hold it" for what in left_out]
    return CondaCapture(lock=lock, text=dumps(lock), manifest=manifest, warnings=tuple(warnings))


def _conda_packages(records: Sequence[Mapping[str, Any]]
                    ) -> tuple[list[CondaPackage], list[str], dict[str, dict[str, Any]]]:
    """The locked conda packages, their channels in first-seen order, and each one's index
    fields by file name (the manifest's ``conda.records``)."""
    conda: list[CondaPackage] = []
    channels: list[str] = []
    extra: dict[str, dict[str, Any]] = {}
    for rec in records:
        url = str(rec["url"])
        channel = _channel_name(str(rec.get("channel") or url.rsplit("/", 2)[0]))
        if channel not in channels:
            channels.append(channel)
        index = {k: v for k, v in rec.items() if k not in _INSTALL_FIELDS}
        index.setdefault("fn", _basename(url))
        conda.append(CondaPackage(
            name=str(rec["name"]), version=str(rec["version"]), build=str(rec.get("build", "")),
            url=url, md5=str(rec.get("md5") or ""), sha256=rec.get("sha256"),
            depends=tuple(str(d) for d in rec.get("depends") or ()), record=index,
        ))
        extra[str(index["fn"])] = index
    return conda, channels, extra


def _pip_packages(prefix: Path, dists: Sequence[Mapping[str, Any]], packages: Sequence[LockedPackage],
                  owned: set[str], supported: Sequence[Tag]) -> tuple[list[PipPackage], list[str], list[str]]:
    """The distributions pip installed on top, locked; the names of those conda owns; the names
    of those with no file to lock (none an installer can fetch again by hash, or none for
    these tags)."""
    by_name = {str(canonicalize_name(p.name)): p for p in packages}
    pip: list[PipPackage] = []
    conda_owned: list[str] = []
    not_locked: list[str] = []
    for d in dists:
        name = str(canonicalize_name(str(d["name"])))
        rel = _relative(str(d.get("dist_info") or ""), prefix)
        if rel is not None and rel in owned:
            conda_owned.append(name)
            continue
        pkg = by_name.get(name)
        if pkg is None:  # envlock itself, left out of every lock
            continue
        picked = choose_file(pkg.files, installed_tags(d.get("dist_info")), supported) if pkg.locked else None
        if picked is None:
            not_locked.append(name)
            continue
        pip.append(PipPackage(name=name, version=pkg.version, url=picked.url, sha256=picked.sha256,
                              dependencies=_pip_dependencies(pkg.requires)))
    return pip, conda_owned, not_locked


# --- the conda-lock v1 document ------------------------------------------------------------


def to_document(lock: CondaLock) -> dict[str, Any]:
    packages: list[dict[str, Any]] = []
    for c in sorted(lock.conda, key=lambda p: p.name):
        hashes = {"md5": c.md5, **({"sha256": c.sha256} if c.sha256 else {})}
        packages.append({
            "name": c.name, "version": c.version, "manager": "conda", "platform": lock.platform,
            "dependencies": _spec_dict(c.depends), "url": c.url, "hash": hashes,
            "build": c.build, "category": "main", "optional": False,
        })
    for p in lock.pip:
        packages.append({
            "name": p.name, "version": p.version, "manager": "pip", "platform": lock.platform,
            "dependencies": dict(p.dependencies), "url": p.url,
            "hash": {"sha256": p.sha256} if p.sha256 else {},
            "category": "main", "optional": False,
        })
    return {
        "version": LOCK_VERSION,
        "metadata": {
            "content_hash": {lock.platform: lock.content_hash()},
            "channels": [{"url": c, "used_env_vars": []} for c in lock.channels],
            "platforms": [lock.platform],
            "sources": [],
            "custom_metadata": {"generator": "envlock", "source": "conda-meta"},
        },
        "package": packages,
    }


def dumps(lock: CondaLock) -> str:
    head = ("# Written by envlock from the environment's conda-meta/ (no solver: the installed set\n"
            "# is the solution). conda-lock's unified format, version 1: `conda-lock install`,\n"
            "# `conda-lock render` and `micromamba create -f` read it.\n")
    return head + dump_yaml(to_document(lock))


def _record_from_entry(entry: Mapping[str, Any], platform: str) -> dict[str, Any]:
    """The index fields of a conda entry when the manifest has none for it (a lock file
    written by another tool): what the entry and its URL say."""
    url = str(entry["url"])
    deps = entry.get("dependencies") or {}
    return {
        "name": entry["name"], "version": entry["version"], "build": entry.get("build") or "",
        "build_number": 0, "subdir": _subdir_of(url) or platform, "fn": _basename(url), "url": url,
        "depends": [n if v in ("*", "") else f"{n} {v}" for n, v in deps.items()],
        "md5": (entry.get("hash") or {}).get("md5"), "sha256": (entry.get("hash") or {}).get("sha256"),
        "channel": url.rsplit("/", 2)[0],
    }


def from_document(doc: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]] | None = None,
                  *, where: str = LOCKFILE) -> CondaLock:
    """A :class:`CondaLock` from a conda-lock v1 document (strict about the version)."""
    version = doc.get("version")
    if version != LOCK_VERSION:
        raise SidecarError(where, f"conda-lock version {version!r} is not supported (envlock reads "
                           f"version {LOCK_VERSION})")
    meta = doc.get("metadata") or {}
    platforms = list(meta.get("platforms") or [])
    if len(platforms) != 1:
        raise SidecarError(where, f"expected one platform, found {platforms or 'none'}")
    plat = str(platforms[0])
    channels = tuple(str(c["url"]) if isinstance(c, Mapping) else str(c) for c in meta.get("channels") or ())
    records = records or {}
    conda: list[CondaPackage] = []
    pip: list[PipPackage] = []
    try:
        for entry in doc.get("package") or ():
            if entry.get("platform") != plat:
                continue
            hashes = entry.get("hash") or {}
            if entry["manager"] == "conda":
                fn = _basename(str(entry["url"]))
                rec = dict(records.get(fn) or _record_from_entry(entry, plat))
                conda.append(CondaPackage(
                    name=str(entry["name"]), version=str(entry["version"]),
                    build=str(entry.get("build") or rec.get("build") or ""), url=str(entry["url"]),
                    md5=str(hashes.get("md5") or ""), sha256=hashes.get("sha256"),
                    depends=tuple(str(d) for d in rec.get("depends") or ()), record=rec,
                ))
            elif entry["manager"] == "pip":
                pip.append(PipPackage(name=str(entry["name"]), version=str(entry["version"]),
                                      url=str(entry["url"]), sha256=hashes.get("sha256"),
                                      dependencies=dict(entry.get("dependencies") or {})))
            else:
                raise SidecarError(where, f"unknown manager {entry['manager']!r} for {entry['name']}")
    except (KeyError, TypeError, AttributeError) as exc:
        raise SidecarError(where, f"not a conda-lock v1 file ({type(exc).__name__}: {exc})") from exc
    return CondaLock(platform=plat, channels=channels, conda=tuple(conda), pip=tuple(pip))


def loads(text: str, records: Mapping[str, Mapping[str, Any]] | None = None, *,
          where: str = LOCKFILE) -> CondaLock:
    try:
        doc = load_yaml(text)
    except ValueError as exc:
        raise SidecarError(where, f"not readable: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise SidecarError(where, "not a conda-lock file (no mapping at the top)")
    return from_document(doc, records, where=where)


def from_sidecar(sc: Any) -> CondaLock | None:
    """The sidecar's conda lock (``sc`` a :class:`envlock.sidecar.store.Sidecar`), or None when it
    was captured outside conda."""
    path = Path(sc.file(LOCKFILE))
    if not path.is_file():
        return None
    records = (sc.get("conda", "records") or {})
    return loads(path.read_text(encoding="utf-8"), records, where=str(path))


__all__ = [
    "LOCKFILE", "CondaCapture", "CondaLock", "CondaPackage", "PipPackage", "capture", "dumps",
    "from_document", "from_sidecar", "is_conda_prefix", "loads", "owned_dist_infos", "read_conda_meta",
    "this_platform", "to_document",
]
