"""The environment cache: one virtual environment per lock key, built once, shared by every run.

Layout of ``Settings.env_cache``::

    <key>/                  a complete environment (holds .envlock-complete)
    <key>.lock              the file lock serialising builds and removals of <key>
    .tmp-<key>-<random>/    a build in progress, or what a killed build left behind
    .trash-<name>-<random>/ a folder being removed

**All or nothing.** An environment is built in ``.tmp-<key>-<random>``, the marker
``.envlock-complete`` is written into it last, and only then is the folder renamed to ``<key>``
(one atomic ``rename(2)`` in the same directory). So ``<key>`` exists only complete; a build
that fails, is interrupted or is SIGKILLed leaves at most a ``.tmp-`` folder, which the next
build of that key (holding the lock, so it knows nobody else is writing there) or ``gc``
removes. Removal works the other way round: rename to ``.trash-`` first, then delete, so a
removal cut short never leaves a half-deleted folder under a complete-looking name.

**Why the rename is safe for a venv.** A venv is usually not relocatable, but what breaks is
only what holds the venv's own path: activation scripts and console-script shebangs.
``bin/python`` is a symlink to the *base* interpreter and ``pyvenv.cfg`` names the base
interpreter's folder; Python finds its ``sys.prefix`` from ``pyvenv.cfg`` next to the path it
was started by, so a renamed venv works. With uv the venv is created ``--relocatable``, which
makes activation and console scripts locate themselves at run time. With the pip fallback the
scripts are rewritten, before the marker is written, to name the final path
(``envbuild.retarget_scripts``). Tests run a console script from a renamed venv of each kind.

**Concurrency.** Every ``ensure`` takes the key's lock (uncontended that costs microseconds),
so concurrent runs wait for one build and then find it complete, and ``gc`` (which only takes
locks it can get at once) never removes an environment while ``ensure`` is touching it.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import filelock

import envlock
from envlock.envs.build import Progress, VenvBuild, emit, env_python
from envlock.envs.key import EnvSpec
from envlock.errors import (
    BadInputError,
    EnvironmentBuildError,
)
from envlock.fs import atomic_write
from envlock.settings import Settings

MARKER = ".envlock-complete"
MARKER_SCHEMA = 1
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """A complete environment. ``python`` is its ``bin/python``; ``built`` says this call built it."""

    path: Path
    python: Path
    key: str
    built: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class EnvInfo:
    """A complete environment as ``list`` reports it. ``size``: bytes of its files, each
    counted once; most are hardlinks into uv's cache, so removing it frees less than that."""

    key: str
    path: Path
    python_version: str
    base_python: str
    installer: str
    created: datetime
    last_used: datetime
    size: int


@dataclass(frozen=True)
class Removed:
    """One folder ``gc`` removed; ``reason`` is ``partial``, ``age`` or ``size``."""

    key: str
    path: Path
    reason: str
    size: int


# --- helpers ---------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: object) -> datetime:
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _tree_size(root: Path) -> int:
    """Bytes of the files under ``root``, each inode once (uv hardlinks from its cache)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            total += st.st_size
    return total


def _write_json_atomic(path: Path, doc: Mapping[str, object]) -> None:
    atomic_write(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", mode=0o644)


def _used_before(t: datetime) -> Callable[[Mapping[str, object]], bool]:
    return lambda doc: _parse_time(doc.get("last_used")) < t


def _key_of_leftover(name: str) -> str | None:
    for prefix in (_TMP_PREFIX, _TRASH_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):].rpartition("-")[0] or None
    return None


# --- the cache -------------------------------------------------------------------------------


class EnvCache:
    """Environments under ``settings.env_cache``, keyed by :func:`lock_key`.

    ``installer``: ``auto`` (uv, else pip), ``uv`` or ``pip``.
    """

    def __init__(self, settings: Settings, *, installer: str = "auto") -> None:
        if installer not in ("auto", "uv", "pip"):
            raise ValueError(f"installer must be auto, uv or pip, not {installer!r}")
        self.settings = settings
        self.root = settings.env_cache
        self.installer = installer

    # paths

    def path_for(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a valid environment key: {key!r}")
        return self.root / key

    def _lock(self, key: str) -> filelock.FileLock:
        return filelock.FileLock(str(self.root / f"{key}.lock"))

    # reading

    def _read_marker(self, key: str) -> dict[str, object] | None:
        path = self.path_for(key)
        try:
            doc = json.loads((path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        # The base interpreter a venv links to can be uninstalled; then the env is broken.
        if not env_python(path).exists():
            return None
        return doc

    def find(self, key: str) -> Env | None:
        """The complete environment for ``key``, or None."""
        if self._read_marker(key) is None:
            return None
        path = self.path_for(key)
        return Env(path=path, python=env_python(path), key=key)

    def _info(self, key: str, doc: Mapping[str, object]) -> EnvInfo:
        size = doc.get("size")
        if not isinstance(size, int):
            size = self._measure(key, doc)
        return EnvInfo(
            key=key,
            path=self.path_for(key),
            python_version=str(doc.get("python", "")),
            base_python=str(doc.get("base_python", "")),
            installer=str(doc.get("installer", "")),
            created=_parse_time(doc.get("created")),
            last_used=_parse_time(doc.get("last_used")),
            size=size,
        )

    def _measure(self, key: str, doc: Mapping[str, object]) -> int:
        """Size of a complete environment, recorded in its marker the first time it is asked."""
        size = _tree_size(self.path_for(key))
        with self._try_lock(key) as got:
            current = self._read_marker(key) if got else None
            if current is not None:
                with contextlib.suppress(OSError):
                    _write_json_atomic(self.path_for(key) / MARKER, {**current, "size": size})
        return size

    def list(self) -> builtins.list[EnvInfo]:
        """Complete environments, most recently used first."""
        if not self.root.is_dir():
            return []
        infos = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not _KEY_RE.fullmatch(entry.name) or not entry.is_dir():
                continue
            doc = self._read_marker(entry.name)
            if doc is not None:
                infos.append(self._info(entry.name, doc))
        return sorted(infos, key=lambda i: i.last_used, reverse=True)

    # building

    def ensure(self, spec: EnvSpec, *, progress: Progress | None = None,
               lock_timeout: float | None = None) -> Env:
        """The environment for ``spec``: found (last use recorded) or built, all or nothing."""
        def build(final: Path) -> Env:
            fill = VenvBuild(spec, self.settings, final, progress, installer=self.installer)
            return self.build_into(spec.key, fill, progress=progress)

        return self.ensure_key(spec.key, build, progress=progress, lock_timeout=lock_timeout)

    def ensure_key(self, key: str, build: Callable[[Path], Env], *, progress: Progress | None = None,
                   lock_timeout: float | None = None) -> Env:
        """The environment for ``key``: found (last use recorded), or made by ``build(final)``
        under the key's lock, leftovers of earlier builds removed first. ``build`` must leave
        ``final`` complete or not at all (:meth:`build_into` does that)."""
        final = self.path_for(key)
        lock = self._lock(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
        except filelock.Timeout:
            emit(progress, "wait", f"waiting for another process building {final.name}")
            try:
                lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
            except filelock.Timeout:
                raise EnvironmentBuildError(
                    f"timed out after {lock_timeout:.0f}s waiting for another process building {final}",
                    hint="wait for the other envlock to finish, or stop it",
                ) from None
        except OSError as exc:
            # A read-only cache (baked into an image, say) can still serve what it holds.
            found = self.find(key)
            if found is not None:
                return found
            raise EnvironmentBuildError(f"cannot write to the environment cache {self.root}: {exc}",
                                        hint="set ENVLOCK_HOME to a writable folder") from exc
        try:
            doc = self._read_marker(key)
            if doc is not None:
                doc = {**doc, "last_used": _iso(_now())}
                with contextlib.suppress(OSError):  # a read-only cache still works
                    _write_json_atomic(final / MARKER, doc)
                return Env(path=final, python=env_python(final), key=key)
            self._remove_leftovers(key, progress)
            return build(final)
        finally:
            lock.release()

    def build_into(self, key: str, fill: Callable[[Path], Mapping[str, object]], *,
                   in_place: bool = False, progress: Progress | None = None) -> Env:
        """Build ``key`` all or nothing, from inside an :meth:`ensure_key` builder (so under
        the key's lock): ``fill(where)`` creates and fills ``where`` and returns the marker
        fields describing what it holds; the marker is written last, then ``where`` is renamed
        to the key's folder. ``in_place`` builds in the key's folder itself, for installers
        whose files must name their final path (conda writes its prefix into files while it
        links): the folder only counts once the marker is in, and a build cut short is
        removed by the next ``ensure`` or ``gc`` like any leftover.
        """
        started = time.monotonic()
        final = self.path_for(key)
        where = final if in_place else self.root / f"{_TMP_PREFIX}{key}-{secrets.token_hex(4)}"
        try:
            fields = dict(fill(where))
            now = _iso(_now())
            marker = {"schema": MARKER_SCHEMA, **fields, "key": key, "envlock": envlock.__version__,
                      "created": now, "last_used": now, "size": None}
            _write_json_atomic(where / MARKER, marker)
            if not in_place:
                os.rename(where, final)
        except BaseException:
            self._discard(where)
            raise
        emit(progress, "done", f"built {final} in {time.monotonic() - started:.1f}s")
        return Env(path=final, python=env_python(final), key=key, built=True)

    def _remove_leftovers(self, key: str, progress: Progress | None) -> None:
        """Under the key's lock no envlock writes to a folder of this key; what is there is left
        over. (An installer orphaned by a SIGKILLed envlock may still write into its ``.tmp-``
        folder; it never gets a marker, and the next ``ensure`` or ``gc`` removes it.)"""
        final = self.path_for(key)
        if final.exists() or final.is_symlink():
            emit(progress, "cleanup", f"removing incomplete environment {final}")
            self._discard(final)
        for entry in self.root.iterdir():
            if _key_of_leftover(entry.name) == key:
                emit(progress, "cleanup", f"removing leftover {entry}")
                self._discard(entry)

    def _discard(self, path: Path) -> None:
        """Remove ``path``: renamed away first, so it disappears from its name at once."""
        if path.name.startswith(_TRASH_PREFIX):
            trash = path
        else:
            key = _key_of_leftover(path.name) or path.name
            trash = self.root / f"{_TRASH_PREFIX}{key}-{secrets.token_hex(4)}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                trash.unlink()

    # removing

    def gc(self, *, older_than: timedelta | None = None,
           max_total_bytes: int | None = None) -> builtins.list[Removed]:
        """Remove leftovers, then environments unused for ``older_than``, then the least
        recently used until the total is at most ``max_total_bytes``. An environment whose
        lock is held (being built, or touched by ``ensure`` right now) is never removed.
        """
        if older_than is not None and older_than < timedelta(0):
            raise BadInputError(f"cannot remove environments unused for a negative time ({older_than})")
        if max_total_bytes is not None and max_total_bytes < 0:
            raise BadInputError(f"the cache cannot be made smaller than 0 bytes ({max_total_bytes})")
        removed: builtins.list[Removed] = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            key = _key_of_leftover(entry.name)
            if entry.name.startswith(_TRASH_PREFIX):
                size = _tree_size(entry)
                self._discard(entry)
                removed.append(Removed(key or "", entry, "partial", size))
            elif key is not None or (
                _KEY_RE.fullmatch(entry.name) and entry.is_dir() and self._read_marker(entry.name) is None
            ):
                k = key or entry.name
                with self._try_lock(k) as got:
                    if got and entry.exists() and (key is not None or self._read_marker(k) is None):
                        size = _tree_size(entry)
                        self._discard(entry)
                        removed.append(Removed(k, entry, "partial", size))
        infos = sorted(self.list(), key=lambda i: i.last_used)
        if older_than is not None:
            cutoff = _now() - older_than
            for info in list(infos):
                if info.last_used < cutoff and self._remove_if(info, _used_before(cutoff)):
                    removed.append(Removed(info.key, info.path, "age", info.size))
                    infos.remove(info)
        if max_total_bytes is not None:
            total = sum(i.size for i in infos)
            for info in list(infos):
                if total <= max_total_bytes:
                    break
                # Unless used since it was listed: then it is no longer the oldest.
                if self._remove_if(info, _used_before(info.last_used + timedelta(milliseconds=1))):
                    removed.append(Removed(info.key, info.path, "size", info.size))
                    total -= info.size
        return removed

    @contextlib.contextmanager
    def _try_lock(self, key: str) -> Iterator[bool]:
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def _remove_if(self, info: EnvInfo, still: Callable[[Mapping[str, object]], bool]) -> bool:
        """Remove ``info``'s environment if its lock is free and ``still`` holds under it."""
        with self._try_lock(info.key) as got:
            if not got:
                return False
            doc = self._read_marker(info.key)
            if doc is None or not still(doc):
                return False
            self._discard(info.path)
            return True


__all__ = ["MARKER", "Env", "EnvCache", "EnvInfo", "Removed"]
