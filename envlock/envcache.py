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
(``_retarget_scripts``). Tests run a console script from a renamed venv of each kind.

**Concurrency.** Every ``ensure`` takes the key's lock (uncontended that costs microseconds),
so concurrent runs wait for one build and then find it complete, and ``gc`` (which only takes
locks it can get at once) never removes an environment while ``ensure`` is touching it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sysconfig
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import filelock
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

import envlock
from envlock import proc
from envlock.errors import (
    BadInputError,
    CommandError,
    EnvironmentBuildError,
    HashMismatchError,
    NetworkError,
    ToolNotFoundError,
)
from envlock.interpreters import Interpreter, find_python
from envlock.settings import Settings
from envlock.tools import pip as pip_tool
from envlock.tools import uv as uv_tool

MARKER = ".envlock-complete"
MARKER_SCHEMA = 1
LOCK_KEY_SCHEMA = 1
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Options that only say where files come from: with hashes they do not change what is installed.
_SOURCE_OPTIONS = ("--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--trusted-host",
                   "--no-index", "--prefer-binary", "--pre")
_HASH_RE = re.compile(r"--hash[=\s]+(\S+)")
_SEED_PACKAGES = ("pip", "setuptools", "wheel")


# --- the lock key ----------------------------------------------------------------------------


def _logical_lines(text: str) -> Iterator[str]:
    """Requirement-file lines with continuations joined and comments dropped (pip's rules)."""
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


def _canonical_requirement(line: str) -> str:
    hashes = sorted(h.lower() for h in _HASH_RE.findall(line))
    body = _HASH_RE.sub("", line).strip()
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
    for line in _logical_lines(requirements_text):
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


def locked_requirements(requirements_text: str) -> Iterator[tuple[Requirement, str]]:
    """Each requirement of a lock file with its whole logical line (options and comments skipped)."""
    for line in _logical_lines(requirements_text):
        if line.startswith("-"):
            continue
        try:
            yield Requirement(_HASH_RE.sub("", line).strip()), line
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
    reqs = [ln for ln in _logical_lines(requirements_text) if not ln.startswith("-")]
    return bool(reqs) and all(_HASH_RE.search(ln) for ln in reqs)


# --- values ----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class BuildEvent:
    """Progress of :meth:`EnvCache.ensure`.

    ``stage``: ``wait`` (another process builds this key), ``cleanup`` (a leftover was removed),
    ``interpreter``, ``warning``, ``venv``, ``install``, ``output`` (one line of the
    installer's output), ``done``.
    """

    stage: str
    message: str


@dataclass(frozen=True)
class InventoryDiff:
    missing: dict[str, str]
    different: dict[str, tuple[str, str]]  # name -> (locked, installed)
    extra: dict[str, str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.different or self.extra)


Progress = Callable[[BuildEvent], None]


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


def env_python(env_path: Path) -> Path:
    if os.name == "nt":
        return env_path / "Scripts" / "python.exe"
    return env_path / "bin" / "python"


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


def _retarget_scripts(env_path: Path, old: Path, new: Path) -> None:
    """Make scripts written for ``old`` (shebangs, activate) name ``new`` (the pip fallback)."""
    old_b, new_b = os.fsencode(str(old)), os.fsencode(str(new))
    bindir = env_python(env_path).parent
    candidates = [*bindir.iterdir(), env_path / "pyvenv.cfg"] if bindir.is_dir() else []
    for f in candidates:
        try:
            st = f.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1_000_000:
            continue
        data = f.read_bytes()
        if old_b in data:
            f.write_bytes(data.replace(old_b, new_b))
            os.chmod(f, stat.S_IMODE(st.st_mode))


def _write_json_atomic(path: Path, doc: Mapping[str, object]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _emit(progress: Progress | None, stage: str, message: str) -> None:
    if progress is not None:
        progress(BuildEvent(stage, message))


# What uv and pip say when a pinned version has no file where they look (deleted from the index,
# or missing from --find-links). A yanked version still installs: an == pin selects it (PEP 592).
_UNAVAILABLE = (
    re.compile(r"there is no version of ([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s,]+)"),
    re.compile(r"Because ([A-Za-z0-9][A-Za-z0-9._-]*) was not found in the "
               r"(?:package registry|provided package locations|cache)"),
    re.compile(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([^\s;]+))?"),
)


# What uv (reqwest/hyper) and pip (urllib3/requests) say when the index cannot be asked at all.
# Checked before _UNAVAILABLE: pip ends a refused connection with "No matching distribution
# found", which is not a deleted version. First match wins, most specific first.
_NETWORK = (
    ("refused", re.compile(r"Connection refused|ConnectionRefusedError|os error 111|Errno 111")),
    ("dns", re.compile(r"dns error|Name or service not known|Temporary failure in name resolution|"
                       r"failed to lookup address|nodename nor servname|getaddrinfo failed")),
    ("tls", re.compile(r"SSL: CERTIFICATE_VERIFY_FAILED|certificate verify failed|invalid peer certificate|"
                       r"SSLError|tls handshake", re.IGNORECASE)),
    ("timeout", re.compile(r"timed out|operation timed out|Read timed out|ConnectTimeoutError|"
                           r"ReadTimeoutError|timeout", re.IGNORECASE)),
    ("http", re.compile(r"HTTP status (?:server|client) error \((\d{3}[^)]*)\)|HTTP error (\d{3})|"
                        r"(\d{3}) (?:Client|Server) Error|status code (\d{3})")),
)


def network_failure(text: str, where: str) -> NetworkError | None:
    """The installer could not reach the index: which of four ways, or None."""
    for kind, pattern in _NETWORK:
        m = pattern.search(text)
        if m is None:
            continue
        if kind == "http":
            code = next((g for g in m.groups() if g), "")
            if code.startswith("404") or code.startswith("410"):
                return None  # "not found": the missing-version path explains it
            return NetworkError(kind, where, f"HTTP {code}")
        return NetworkError(kind, where)
    return None


_HASH_MISMATCH = (
    re.compile(r"Hash mismatch for `([^`]+)`"),  # uv
    re.compile(r"^\s+(\S+==\S+) from \S+.*:\s*\n\s+Expected sha256", re.MULTILINE),  # pip
)


def _hash_mismatch(exc: CommandError) -> HashMismatchError | None:
    """The installer refused a file whose sha256 is not in the lock: say which package, and why
    that matters, instead of ending on a bare ``sha256:89cd…``."""
    for pattern in _HASH_MISMATCH:
        found = sorted(set(pattern.findall(exc.stderr_tail)))
        if found:
            return HashMismatchError(found, exc)
    return None


def _ask_index(settings: Settings, name: str, version: str) -> NetworkError | None:
    """A NetworkError when the index cannot be asked about ``name==version``; None when it answers."""
    from envlock.index import IndexClient

    if not version:
        return None
    result = IndexClient(settings.with_(offline=False)).lookup(name, version)
    if result.ok or result.error_kind in (None, "absent", "offline"):
        return None
    status = re.search(r"HTTP \d{3}", result.error or "") if result.error_kind == "http" else None
    return NetworkError(result.error_kind or "network", ", ".join(settings.index_urls),
                        status.group(0) if status else "")


def _unavailable(exc: CommandError, spec: EnvSpec, settings: Settings,
                 offline: bool) -> EnvironmentBuildError | None:
    """A failed install explained: the index could not be reached (NetworkError), or this
    locked version is not available; None when it is neither."""
    text = exc.stderr_tail
    if not spec.no_index and not offline:
        net = network_failure(text, ", ".join(settings.index_urls))
        if net is not None:
            return net
    names: dict[str, str] = {}
    for pattern in _UNAVAILABLE:
        for m in pattern.finditer(text):
            name = str(canonicalize_name(m.group(1)))
            names.setdefault(name, (m.group(2) if pattern.groups >= 2 else None) or "")
    if not names:
        return None
    pins = locked_pins(spec.requirements_path.read_text(encoding="utf-8"))
    if not spec.no_index and not offline:
        # pip reports an index it could not ask (a 503, say) as "no matching distribution", and
        # prints the HTTP status only with -v: ask the index ourselves before saying "deleted".
        first = min(names)
        asked = _ask_index(settings, first, names[first] or pins.get(first, ""))
        if asked is not None:
            return asked
    shown = ", ".join(f"{n}=={v or pins.get(n, '?')}" for n, v in sorted(names.items()))
    if spec.no_index:
        where = "in " + (", ".join(spec.find_links) or "the given folders")
    elif offline:
        where = "in the installer's cache (offline)"
    else:
        where = "on " + ", ".join(settings.index_urls)
        if spec.find_links:
            where += " or in " + ", ".join(spec.find_links)
    return EnvironmentBuildError(
        f"{shown} not found {where}: the locked version is no longer available",
        hint="pass --find-links DIR with a folder holding its wheel (checked against the lock's "
             "hash); `envlock save --vendor` keeps every wheel in the sidecar",
    )


def _prompt(key: str) -> str:
    # Not the folder name, which during the build is the temporary one.
    return f"envlock-{key[:12]}"


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
        self._uv_versions: dict[Path, str] = {}

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
        return self.ensure_key(spec.key, lambda final: self._build(spec, final, progress),
                               progress=progress, lock_timeout=lock_timeout)

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
            _emit(progress, "wait", f"waiting for another process building {final.name}")
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
        _emit(progress, "done", f"built {final} in {time.monotonic() - started:.1f}s")
        return Env(path=final, python=env_python(final), key=key, built=True)

    def _remove_leftovers(self, key: str, progress: Progress | None) -> None:
        """Under the key's lock no envlock writes to a folder of this key; what is there is left
        over. (An installer orphaned by a SIGKILLed envlock may still write into its ``.tmp-``
        folder; it never gets a marker, and the next ``ensure`` or ``gc`` removes it.)"""
        final = self.path_for(key)
        if final.exists() or final.is_symlink():
            _emit(progress, "cleanup", f"removing incomplete environment {final}")
            self._discard(final)
        for entry in self.root.iterdir():
            if _key_of_leftover(entry.name) == key:
                _emit(progress, "cleanup", f"removing leftover {entry}")
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

    def _build(self, spec: EnvSpec, final: Path, progress: Progress | None) -> Env:
        started = time.monotonic()
        uv = self._uv(progress)
        interp = find_python(
            spec.python_version,
            settings=self.settings,
            allow_download=spec.allow_python_download,
            on_warning=lambda msg: _emit(progress, "warning", msg),
        )
        _emit(progress, "interpreter", f"Python {interp.version} at {interp.path} ({interp.source})")
        tmp = self.root / f"{_TMP_PREFIX}{spec.key}-{secrets.token_hex(4)}"
        try:
            try:
                if uv is not None:
                    installer = self._build_uv(uv, spec, interp, tmp, progress)
                else:
                    installer = self._build_pip(spec, interp, tmp, final, progress)
            except CommandError as exc:
                unavailable = _hash_mismatch(exc) or _unavailable(exc, spec, self.settings,
                                                                  self._offline(spec))
                if unavailable is None:
                    raise
                raise unavailable from exc
            now = _iso(_now())
            marker = {
                "schema": MARKER_SCHEMA,
                "key": spec.key,
                "python": interp.version,
                "python_requested": spec.python_version,
                "python_exact": interp.exact,
                "base_python": str(interp.path),
                "installer": installer,
                "envlock": envlock.__version__,
                "created": now,
                "last_used": now,
                # Measured when `cache list`/`gc` first needs it: walking ~25k files of a
                # TensorFlow environment is a tenth of its whole build.
                "size": None,
            }
            # Last: the marker is what makes the folder count as complete.
            _write_json_atomic(tmp / MARKER, marker)
            os.rename(tmp, final)
        except BaseException:
            # Failure or Ctrl-C: proc.run has already killed the installer.
            self._discard(tmp)
            raise
        _emit(progress, "done", f"built {final} in {time.monotonic() - started:.1f}s")
        return Env(path=final, python=env_python(final), key=spec.key, built=True)

    def _uv(self, progress: Progress | None) -> Path | None:
        if self.installer == "pip":
            return None
        try:
            uv = uv_tool.find_uv(self.settings.uv_path)
        except ToolNotFoundError:
            if self.installer == "uv" or self.settings.uv_path:
                raise
            _emit(progress, "warning", "uv not found: building with pip, which is slower")
            return None
        have = self._uv_version(uv)
        if uv_tool.version_tuple(have) < uv_tool.MIN_VERSION:
            need = ".".join(map(str, uv_tool.MIN_VERSION))
            raise EnvironmentBuildError(f"uv {have} at {uv} is too old (envlock needs {need} or newer)",
                                        hint="upgrade uv (`uv self update` or `pip install -U uv`)")
        return uv

    def _uv_version(self, uv: Path) -> str:
        # One `uv --version` per cache object, not one per use: each is a process start.
        if uv not in self._uv_versions:
            self._uv_versions[uv] = uv_tool.version(uv)
        return self._uv_versions[uv]

    def _offline(self, spec: EnvSpec) -> bool:
        return self.settings.offline if spec.offline is None else spec.offline

    def _build_uv(self, uv: Path, spec: EnvSpec, interp: Interpreter, tmp: Path,
                  progress: Progress | None) -> str:
        _emit(progress, "venv", f"creating a virtual environment with uv ({uv})")
        uv_tool.venv(uv, tmp, interp.path, relocatable=True, prompt=_prompt(spec.key))
        _emit(progress, "install", f"installing {spec.requirements_path.name} with uv")
        uv_tool.pip_sync(
            uv, env_python(tmp), spec.requirements_path,
            require_hashes=spec.require_hashes,
            index_urls=self.settings.index_urls,
            find_links=spec.find_links,
            offline=self._offline(spec),
            no_index=spec.no_index,
            on_line=lambda line: _emit(progress, "output", line),
        )
        return f"uv {self._uv_version(uv)}"

    def _build_pip(self, spec: EnvSpec, interp: Interpreter, tmp: Path, final: Path,
                   progress: Progress | None) -> str:
        offline = self._offline(spec)
        on_line = lambda line: _emit(progress, "output", line)  # noqa: E731
        try:
            base_pip: tuple[int, ...] | None = pip_tool.find_pip(interp.path)
        except ToolNotFoundError:
            base_pip = None
        _emit(progress, "venv", f"creating a virtual environment with {interp.path} -m venv")
        if base_pip is not None and base_pip >= pip_tool.MIN_VERSION_FOR_TARGET:
            # The base interpreter's pip installs into the bare venv: no pip inside it.
            pip_tool.venv(interp.path, tmp, with_pip=False, prompt=_prompt(spec.key))
            _emit(progress, "install", f"installing {spec.requirements_path.name} with pip")
            pip_tool.install(interp.path, spec.requirements_path, target_python=env_python(tmp),
                             require_hashes=spec.require_hashes, index_urls=self.settings.index_urls,
                             find_links=spec.find_links, offline=offline, no_index=spec.no_index,
                             timeout=self.settings.http_timeout, on_line=on_line)
            version = ".".join(map(str, base_pip))
        else:
            # Seed pip into the venv, install, then take the seed packages out again.
            pip_tool.venv(interp.path, tmp, with_pip=True, prompt=_prompt(spec.key))
            inner = pip_tool.find_pip(env_python(tmp))
            _emit(progress, "install", f"installing {spec.requirements_path.name} with pip")
            pip_tool.install(env_python(tmp), spec.requirements_path,
                             require_hashes=spec.require_hashes, index_urls=self.settings.index_urls,
                             find_links=spec.find_links, offline=offline, no_index=spec.no_index,
                             timeout=self.settings.http_timeout, on_line=on_line)
            locked = locked_pins(spec.requirements_path.read_text(encoding="utf-8"))
            pip_tool.uninstall(env_python(tmp), [p for p in _SEED_PACKAGES if p not in locked])
            version = ".".join(map(str, inner))
        _retarget_scripts(tmp, tmp, final)
        return f"pip {version}"

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


# --- does an existing environment already match? ----------------------------------------------


def _inventory_script() -> Path:
    return Path(envlock.__file__).parent / "_worker" / "inventory.py"


def inventory(python: Path) -> dict[str, str]:
    """``{canonical name: version}`` of what ``python`` sees installed (run in that interpreter)."""
    done = proc.run([python, "-I", _inventory_script()], timeout=120,
                    what=f"could not list the packages of {python}")
    try:
        rows = json.loads(done.stdout)
        return {str(canonicalize_name(r["name"])): str(r["version"]) for r in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError([str(python), str(_inventory_script())], 0, done.stdout[-2000:],
                           what=f"unreadable package list from {python}") from exc


def _same_version(a: str, b: str) -> bool:
    try:
        return str(Version(a)) == str(Version(b))
    except InvalidVersion:
        return a == b


def compare_inventory(installed: Mapping[str, str], pins: Mapping[str, str], *,
                      ignore: Collection[str] = ()) -> InventoryDiff:
    skip = {str(canonicalize_name(n)) for n in ignore}
    want = {str(canonicalize_name(n)): v for n, v in pins.items() if canonicalize_name(n) not in skip}
    have = {n: v for n, v in installed.items() if n not in skip}
    return InventoryDiff(
        missing={n: v for n, v in want.items() if n not in have},
        different={n: (v, have[n]) for n, v in want.items() if n in have and not _same_version(v, have[n])},
        extra={n: v for n, v in have.items() if n not in want},
    )


def satisfies(python: Path, pins: Mapping[str, str], *, ignore: Collection[str] = ()) -> bool:
    """Whether ``python``'s environment holds exactly the locked ``name==version`` set.

    ``ignore`` names distributions left out of the comparison on both sides (say, envlock
    itself when the host environment is checked).
    """
    return compare_inventory(inventory(python), pins, ignore=ignore).ok


__all__ = [
    "MARKER", "BuildEvent", "Env", "EnvCache", "EnvInfo", "EnvSpec", "InventoryDiff", "Removed",
    "all_hashed", "canonical_lock", "compare_inventory", "default_platform_tag", "env_python",
    "inventory", "lock_key", "locked_pins", "satisfies",
]
