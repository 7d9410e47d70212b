"""Lock files from installed distributions and index look-ups.

Two renderings of one set of :class:`LockedPackage`:

* ``requirements.lock.txt`` in the format ``pip-compile --generate-hashes --allow-unsafe``
  writes, installable with ``pip install --require-hashes -r``, ``pip-sync`` and
  ``uv pip sync``;
* ``pylock.toml`` (PEP 751), which ``packaging.pylock`` validates.

What no index hash can pin (editable, local and VCS installs) is kept out of the installable
part of both and listed as a reproducibility risk instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import tomli_w
from packaging.markers import InvalidMarker, default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    canonicalize_name,
)

from envlock.index.lookup import DistFile, LookupResult, redact_url
from envlock.settings import DEFAULT_INDEX_URL

# pip-tools' list: with --allow-unsafe they are pinned, in a section of their own at the end.
UNSAFE_PACKAGES = frozenset({"setuptools", "distribute", "pip"})
# Kinds whose code comes from this machine or a VCS checkout rather than a hashed file.
UNLOCKABLE_KINDS = frozenset({"editable", "local", "vcs"})


@dataclass(frozen=True)
class LockedPackage:
    """One distribution as the lock records it.

    ``files`` are every file of that version on the index (or, for a remote archive
    install, the archive itself); empty when the look-up failed, in which case ``error``
    says why. ``via`` names the locked distributions that require this one.
    """

    name: str
    version: str
    kind: str
    files: tuple[DistFile, ...]
    index_url: str | None
    direct_url: dict[str, Any] | None
    requires: tuple[str, ...]
    via: tuple[str, ...]
    error: str | None = None

    @property
    def hashes(self) -> tuple[str, ...]:
        return tuple(sorted({f.sha256 for f in self.files}))

    @property
    def locked(self) -> bool:
        """True when an installer can fetch exactly these bits again, checked by hash."""
        return self.kind not in UNLOCKABLE_KINDS and bool(self.files)


# ---------------------------------------------------------------------------------------------
# Building


_EXTRA_IN_MARKER = re.compile(r"""\bextra\s*==\s*['"]([^'"]+)['"]""")


@dataclass(frozen=True)
class _Deps:
    base: tuple[Requirement, ...]
    by_extra: Mapping[str, tuple[Requirement, ...]]


def _parse_requires(requires: Iterable[str]) -> tuple[list[Requirement], set[str]]:
    reqs: list[Requirement] = []
    extras: set[str] = set()
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        reqs.append(req)
        if req.marker is not None:
            extras.update(canonicalize_name(e) for e in _EXTRA_IN_MARKER.findall(str(req.marker)))
    return reqs, extras


def _applies(req: Requirement, extra: str) -> bool:
    if req.marker is None:
        return True
    try:
        return req.marker.evaluate({"extra": extra})
    except (InvalidMarker, ValueError, TypeError, KeyError):
        return False


def _deps_of(requires: Iterable[str]) -> _Deps:
    reqs, extras = _parse_requires(requires)
    base = tuple(r for r in reqs if _applies(r, ""))
    by_extra = {x: tuple(r for r in reqs if r not in base and _applies(r, x)) for x in sorted(extras)}
    return _Deps(base, by_extra)


def _dependency_edges(dists: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """For each installed name, the installed names it requires (markers evaluated here).

    Nothing records which extras a distribution was installed with, so an extra counts only
    when another installed distribution asks for it (``keras[jax]``), directly or through
    another extra. Guessing from what happens to be installed would name a cause that is
    often false (``pip`` "via" mypy's ``install-types`` extra in every venv).
    """
    names = {str(d["name"]) for d in dists}
    deps = {str(d["name"]): _deps_of(d.get("requires") or ()) for d in dists}
    wanted: dict[str, set[str]] = {name: set() for name in deps}

    def active(name: str) -> list[Requirement]:
        dep = deps[name]
        return list(dep.base) + [r for x in sorted(wanted[name]) for r in dep.by_extra.get(x, ())]

    # An extra's own requirements can ask for more extras: go round until nothing changes
    # (each round only adds, so this ends).
    changed = True
    while changed:
        changed = False
        for name in deps:
            for req in active(name):
                target = str(canonicalize_name(req.name))
                if target in wanted:
                    new = {str(canonicalize_name(e)) for e in req.extras} - wanted[target]
                    if new:
                        wanted[target] |= new
                        changed = True
    return {name: {str(canonicalize_name(r.name)) for r in active(name)} & (names - {name})
            for name in deps}


def _archive_file(direct_url: Mapping[str, Any]) -> DistFile | None:
    """The archive of a direct-URL install as a :class:`DistFile`, when PEP 610 gave a sha256."""
    info = direct_url.get("archive_info")
    url = direct_url.get("url")
    if not isinstance(info, dict) or not isinstance(url, str):
        return None
    sha256 = None
    hashes = info.get("hashes")
    if isinstance(hashes, dict) and isinstance(hashes.get("sha256"), str):
        sha256 = hashes["sha256"]
    elif isinstance(info.get("hash"), str) and info["hash"].startswith("sha256="):
        sha256 = info["hash"].partition("=")[2]  # the older, single-hash PEP 610 field
    if not sha256:
        return None
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return DistFile(filename=filename, url=redact_url(url), sha256=sha256.lower())


def build_lock(dists: list[dict[str, Any]], lookups: Mapping[tuple[str, str], LookupResult], *,
               exclude: Iterable[str] = ("envlock",)) -> list[LockedPackage]:
    """One :class:`LockedPackage` per distribution (minus ``exclude``), sorted by name.

    ``dists`` are :func:`envlock.worker.payload.inventory.installed` entries; ``lookups`` the
    :meth:`envlock.index.lookup.IndexClient.lookup_many` answers keyed by (name, version).
    """
    skip = {canonicalize_name(n) for n in exclude}
    kept = [{**d, "name": str(canonicalize_name(str(d["name"])))} for d in dists]
    kept = [d for d in kept if d["name"] not in skip]
    edges = _dependency_edges(kept)
    via: dict[str, set[str]] = {str(d["name"]): set() for d in kept}
    for name, targets in edges.items():
        for target in targets:
            via[target].add(name)
    found = {(str(canonicalize_name(n)), v): r for (n, v), r in lookups.items()}
    out: list[LockedPackage] = []
    for d in kept:
        name, version = str(d["name"]), str(d["version"])
        kind = str(d.get("kind") or "index")
        direct_url = d.get("direct_url")
        files: tuple[DistFile, ...] = ()
        index_url = None
        error = None
        if kind == "index":
            result = found.get((name, version))
            if result is None:
                error = "not looked up"
            else:
                files, index_url, error = result.files, result.index_url, result.error
        elif kind == "archive" and isinstance(direct_url, dict):
            archive = _archive_file(direct_url)
            if archive is None:
                error = "the archive it was installed from has no recorded sha256"
            else:
                files = (archive,)
        out.append(LockedPackage(
            name=name,
            version=version,
            kind=kind,
            files=files,
            index_url=index_url,
            direct_url=dict(direct_url) if isinstance(direct_url, dict) else None,
            requires=tuple(d.get("requires") or ()),
            via=tuple(sorted(via[name])),
            error=error,
        ))
    out.sort(key=lambda p: p.name)
    return out


# ---------------------------------------------------------------------------------------------
# requirements.lock.txt


def _minor(python_version: str) -> str:
    return ".".join(python_version.split(".")[:2])


def _source_of(pkg: LockedPackage) -> str:
    """Where an unlocked package came from, credentials removed."""
    du = pkg.direct_url or {}
    url = redact_url(str(du.get("url", "")))
    vcs = du.get("vcs_info")
    if isinstance(vcs, dict):
        url = f"{vcs.get('vcs', 'vcs')}+{url}@{vcs.get('commit_id', '?')}"
    sub = du.get("subdirectory")
    if sub:
        url += f"#subdirectory={sub}"
    return url or "unknown source"


def _annotation(via: Sequence[str]) -> list[str]:
    if not via:
        return []
    if len(via) == 1:
        return [f"    # via {via[0]}"]
    return ["    # via", *(f"    #   {v}" for v in via)]


def _entry(pkg: LockedPackage) -> list[str]:
    if pkg.kind == "archive" and pkg.files:
        head = f"{pkg.name} @ {pkg.files[0].url}"
    else:
        head = f"{pkg.name}=={pkg.version}"
    lines: list[str] = []
    hashes = pkg.hashes
    if not hashes:
        reason = pkg.error or "no files on the index"
        lines += [
            f"# WARNING: no hash for the following package ({reason}).",
            "# `pip install --require-hashes` refuses this file until it is locked again with",
            "# the index reachable.",
            head,
        ]
    else:
        lines.append(head + " \\")
        lines += [f"    --hash=sha256:{h} \\" for h in hashes[:-1]]
        lines.append(f"    --hash=sha256:{hashes[-1]}")
    return lines + _annotation(pkg.via)


def render_requirements(pkgs: Sequence[LockedPackage], *, python_version: str, command: str,
                        index_urls: Sequence[str]) -> str:
    """``pkgs`` as ``pip-compile --generate-hashes --allow-unsafe`` would write them."""
    lines = [
        "#",
        f"# This file is autogenerated by pip-compile with Python {_minor(python_version)}",
        "# by the following command:",
        "#",
        f"#    {command}",
        "#",
    ]
    flags: list[str] = []
    for i, url in enumerate(dict.fromkeys(redact_url(u).rstrip("/") for u in index_urls)):
        if i == 0 and url == DEFAULT_INDEX_URL:
            continue
        flags.append(f"{'--index-url' if i == 0 else '--extra-index-url'} {url}")
    if flags:
        lines += [*flags, ""]
    ordered = sorted(pkgs, key=lambda p: p.name)
    installable = [p for p in ordered if p.kind not in UNLOCKABLE_KINDS
                   and not (p.kind == "archive" and not p.files)]
    unlocked = [p for p in ordered if p not in installable]
    for pkg in installable:
        if pkg.name not in UNSAFE_PACKAGES:
            lines += _entry(pkg)
    unsafe = [p for p in installable if p.name in UNSAFE_PACKAGES]
    if unsafe:
        lines += ["", "# The following packages are considered to be unsafe in a requirements file:"]
        for pkg in unsafe:
            lines += _entry(pkg)
    if unlocked:
        lines += [
            "",
            "# The following packages are NOT locked: they were installed from a local directory,",
            "# an editable checkout, a VCS URL or an unhashed archive, which no index hash can pin.",
            "# Installing from this file leaves them out (a reproducibility risk); install them",
            "# by hand from the source shown.",
        ]
        for pkg in unlocked:
            lines.append(f"#   {pkg.name}=={pkg.version}  ({pkg.kind}: {_source_of(pkg)})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# pylock.toml


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        # fromisoformat takes a trailing "Z" only from Python 3.11 on.
        return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        return None


def _file_table(f: DistFile) -> dict[str, Any]:
    table: dict[str, Any] = {"name": f.filename, "url": f.url}
    if f.size is not None:
        table["size"] = f.size
    when = _datetime(f.upload_time)
    if when is not None:
        table["upload-time"] = when
    table["hashes"] = {"sha256": f.sha256}
    return table


def _environment_marker(python_version: str) -> str:
    env = default_environment()
    return (f'sys_platform == "{env["sys_platform"]}" and platform_machine == "{env["platform_machine"]}"'
            f' and implementation_name == "{env["implementation_name"]}"'
            f' and python_version == "{_minor(python_version)}"')


def _file_path(url: str) -> str:
    return url2pathname(unquote(urlsplit(url).path))


def _pylock_package(pkg: LockedPackage) -> dict[str, Any] | None:
    """The ``[[packages]]`` table, or None when PEP 751 has no way to say where it is from."""
    du = pkg.direct_url or {}
    url = str(du.get("url", ""))
    table: dict[str, Any] = {"name": pkg.name}
    sub = du.get("subdirectory")
    if isinstance(du.get("dir_info"), dict):
        # A source tree: PEP 751 forbids a version that the tree could contradict.
        directory: dict[str, Any] = {"path": _file_path(url)}
        if du["dir_info"].get("editable"):
            directory["editable"] = True
        if sub:
            directory["subdirectory"] = sub
        table["directory"] = directory
        return table
    table["version"] = pkg.version
    vcs = du.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("commit_id"):
        entry: dict[str, Any] = {"type": str(vcs.get("vcs", "git")), "url": redact_url(url),
                                 "commit-id": str(vcs["commit_id"])}
        if vcs.get("requested_revision"):
            entry["requested-revision"] = str(vcs["requested_revision"])
        if sub:
            entry["subdirectory"] = sub
        table["vcs"] = entry
        return table
    if isinstance(du.get("archive_info"), dict):
        archive = _archive_file(du)
        if archive is None:
            return None
        where = {"path": _file_path(url)} if url.startswith("file:") else {"url": archive.url}
        table["archive"] = {**where, "hashes": {"sha256": archive.sha256}}
        if sub:
            table["archive"]["subdirectory"] = sub
        return table
    if not pkg.files:
        return None
    if pkg.index_url:
        table["index"] = pkg.index_url
    sdists = [f for f in pkg.files if not f.is_wheel]
    # PEP 751 has room for one sdist; .tar.gz is the standard form. Every file still
    # counts in requirements.lock.txt, where any of them may be installed.
    sdists.sort(key=lambda f: (not f.filename.endswith(".tar.gz"), f.filename))
    if sdists:
        table["sdist"] = _file_table(sdists[0])
    wheels = [_file_table(f) for f in pkg.files if f.is_wheel]
    if wheels:
        table["wheels"] = wheels
    return table


def render_pylock(pkgs: Sequence[LockedPackage], *, python_version: str, created_by: str) -> str:
    """``pkgs`` as a PEP 751 ``pylock.toml`` for this platform and Python.

    Packages that PEP 751 cannot express (no hash known: offline, or an archive installed
    without one) are listed under ``[tool.envlock] not-locked`` with the reason.
    """
    packages: list[dict[str, Any]] = []
    not_locked: list[dict[str, str]] = []
    for pkg in sorted(pkgs, key=lambda p: p.name):
        table = _pylock_package(pkg)
        if table is None:
            not_locked.append({"name": pkg.name, "version": pkg.version, "kind": pkg.kind,
                               "reason": pkg.error or "no hash known"})
        else:
            packages.append(table)
    doc: dict[str, Any] = {
        "lock-version": "1.0",
        "environments": [_environment_marker(python_version)],
        "requires-python": f"=={_minor(python_version)}.*",
        "created-by": created_by,
        "packages": packages,
    }
    risks = [{"name": p.name, "version": p.version, "kind": p.kind, "source": _source_of(p)}
             for p in pkgs if p.kind in UNLOCKABLE_KINDS]
    if not_locked or risks:
        tool: dict[str, Any] = {}
        if not_locked:
            tool["not-locked"] = not_locked
        if risks:
            # Present above as directory/vcs entries, but not reproducible from this file alone.
            tool["reproducibility-risks"] = risks
        doc["tool"] = {"envlock": tool}
    return tomli_w.dumps(doc)
