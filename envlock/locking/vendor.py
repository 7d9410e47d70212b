"""`envlock save --vendor`: the file of every locked distribution, for the sidecar's ``wheels/``.

**Which file.** One per locked distribution: the one installed here, as
:func:`envlock.locking.wheels.choose_file` picks it (the conda lock's pip part picks the same). Other
platforms' wheels are not copied: the lock's other hashes stay, so an index can still serve them.

**Where the bytes come from,** always checked against the lock's sha256 before they are kept:

1. envlock's download cache, ``$ENVLOCK_HOME/wheels/<sha256>/<file name>``, and the folders
   given as ``reuse`` (a previous ``wheels/`` of the same model): content-addressed by hash,
   so a re-save downloads nothing;
2. the file's URL as the index listed it (the one in ``pylock.toml``), over HTTP, streamed to
   disk and hashed on the way.

uv's cache is not a source: uv keeps wheels unpacked (``archive-v0/``), not as the files whose
hash the lock records, and repacking them gives other bytes. ``pip download`` is not used: it
needs pip in the captured environment and tag options to find again what is known here exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.tags import Tag, sys_tags

from envlock.errors import EnvironmentBuildError
from envlock.facts.modelfile import file_sha256
from envlock.index.client import HttpClient, HttpFailure, map_on_daemons
from envlock.index.lookup import DistFile
from envlock.locking.lockfiles import UNLOCKABLE_KINDS, LockedPackage
from envlock.locking.wheels import choose_file, installed_tags
from envlock.settings import Settings

WHEELS_DIR = "wheels"
_CHUNK = 1 << 20
Progress = Callable[[str], None]


@dataclass(frozen=True)
class VendoredFile:
    name: str
    version: str
    filename: str
    sha256: str
    path: Path  # where the checked bytes are now (the download cache, or a reused folder)
    source: str  # "cache" | "reused" | "downloaded"


@dataclass(frozen=True)
class VendorResult:
    files: tuple[VendoredFile, ...]
    not_vendored: tuple[dict[str, str], ...]  # {"name", "version", "reason"}: installed otherwise
    warnings: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Every requirement of requirements.lock.txt has its file here: no index needed."""
        return not self.not_vendored

    def manifest(self) -> dict[str, Any]:
        return {
            "folder": WHEELS_DIR,
            "files": len(self.files),
            "complete": self.complete,
            "not_vendored": [dict(x) for x in self.not_vendored],
            "downloaded": sum(1 for f in self.files if f.source == "downloaded"),
        }


# --- getting the bytes ---------------------------------------------------------------------


def _safe_filename(filename: str) -> str:
    name = os.path.basename(filename)
    if not name or name in (".", "..") or name != filename:
        raise EnvironmentBuildError(f"refusing to vendor a file named {filename!r}")
    return name


class _Fetcher:
    """Content-addressed download cache plus HTTP, with the index client's TLS and credentials
    (sent only to the host of the index that has them)."""

    def __init__(self, settings: Settings, reuse: Sequence[Path]) -> None:
        self.root = settings.home / WHEELS_DIR
        self.http = HttpClient(settings, timeout=max(settings.http_timeout, 60.0))
        self.reuse = [Path(p) for p in reuse if Path(p).is_dir()]

    def cached(self, f: DistFile) -> Path:
        return self.root / f.sha256 / _safe_filename(f.filename)

    def get(self, f: DistFile) -> tuple[Path, str]:
        target = self.cached(f)
        if target.is_file() and file_sha256(target) == f.sha256:
            return target, "cache"
        for folder in self.reuse:
            cand = folder / _safe_filename(f.filename)
            if cand.is_file() and file_sha256(cand) == f.sha256:
                return cand, "reused"
        self._download(f, target)
        return target, "downloaded"

    def _download(self, f: DistFile, target: Path) -> None:
        if not f.url.startswith(("http://", "https://")):
            raise _Failed(f"cannot download {f.url} (not an http(s) URL)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                self.http.download(f.url, out, h.update)
            if h.hexdigest() != f.sha256:
                raise _Failed(f"{f.filename} from {f.url} has sha256 {h.hexdigest()}, the lock says "
                              f"{f.sha256}")
            os.replace(tmp, target)
        except HttpFailure as exc:
            raise _Failed(f"could not download: {exc.describe(f.url)}") from exc
        except OSError as exc:
            raise _Failed(f"could not download {f.url}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class _Failed(Exception):
    pass


# --- the whole lock ------------------------------------------------------------------------


def _installable(pkg: LockedPackage) -> bool:
    """Whether requirements.lock.txt lists ``pkg`` as something to install."""
    return pkg.kind not in UNLOCKABLE_KINDS and not (pkg.kind == "archive" and not pkg.files)


def vendor(packages: Iterable[LockedPackage], dists: Iterable[Mapping[str, Any]], settings: Settings, *,
           reuse: Sequence[Path] = (), supported: Sequence[Tag] | None = None, max_workers: int = 4,
           on_progress: Progress | None = None) -> VendorResult:
    """The file of every installable locked package, checked against its sha256.

    Raises EnvironmentBuildError naming every package whose file could not be had: a sidecar
    asked to be self-contained must not be quietly incomplete.
    """
    tags = list(sys_tags()) if supported is None else list(supported)
    dist_info = {str(d["name"]): d.get("dist_info") for d in dists}
    fetcher = _Fetcher(settings, reuse)
    chosen: list[tuple[LockedPackage, DistFile]] = []
    not_vendored: list[dict[str, str]] = []
    failures: list[str] = []
    warnings: list[str] = []
    for pkg in sorted(packages, key=lambda p: p.name):
        if not _installable(pkg):
            continue
        if pkg.kind == "archive":
            # A `name @ url` requirement is fetched from its URL whatever --find-links says.
            not_vendored.append({"name": pkg.name, "version": pkg.version,
                                 "reason": "installed from a direct URL, which the rebuild fetches"})
            continue
        if not pkg.files:
            failures.append(f"{pkg.name} {pkg.version} ({pkg.error or 'no files known on the index'})")
            continue
        f = choose_file(pkg.files, installed_tags(dist_info.get(pkg.name)), tags)
        if f is None:
            failures.append(f"{pkg.name} {pkg.version} (no file on the index fits this interpreter)")
            continue
        if not f.is_wheel:
            warnings.append(f"{pkg.name} {pkg.version} is vendored as its sdist ({f.filename}): an "
                            "offline rebuild needs its build backend among the wheels")
        chosen.append((pkg, f))

    def fetch(item: tuple[LockedPackage, DistFile]) -> VendoredFile | str:
        pkg, f = item
        try:
            path, source = fetcher.get(f)
        except _Failed as exc:
            return f"{pkg.name} {pkg.version} ({exc})"
        if on_progress is not None:
            on_progress(f"{source} {f.filename}")
        return VendoredFile(pkg.name, pkg.version, f.filename, f.sha256, path, source)

    files: list[VendoredFile] = []
    # Daemon threads: a Ctrl-C while files are in flight is not held up by them.
    try:
        for got in map_on_daemons(fetch, chosen, max_workers):
            if isinstance(got, str):
                failures.append(got)
            else:
                files.append(got)
    finally:
        fetcher.http.close()
    if failures:
        raise EnvironmentBuildError(
            f"could not vendor {len(failures)} package(s): " + _first_few(failures),
            hint="check that the index is reachable (the URLs are in pylock.toml), or save without --vendor")
    return VendorResult(tuple(files), tuple(not_vendored), tuple(warnings))


def _first_few(failures: Sequence[str], shown: int = 3) -> str:
    """The first failures in full, then a count: with the index unreachable every package
    fails the same way, and one line naming all 60 of them helps nobody."""
    text = "; ".join(failures[:shown])
    return text if len(failures) <= shown else f"{text}; and {len(failures) - shown} more"


def sidecar_files(result: VendorResult) -> dict[str, Path]:
    """``wheels/<file name>`` → the checked file, for sidecar.write_sidecar."""
    return {f"{WHEELS_DIR}/{f.filename}": f.path for f in result.files}
