"""Building a virtual environment from a lock: uv (pip when uv is missing), the base interpreter
found or fetched, and an installer's failure explained.

:class:`VenvBuild` is the fill function :meth:`envlock.envs.cache.EnvCache.build_into` runs in
a fresh folder; the cache makes it all or nothing. :func:`find_uv_or_pip` is the one "uv, else
pip" choice (venvs, and the pip part of a conda environment).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from envlock.envs.interpreters import find_python
from envlock.envs.key import EnvSpec
from envlock.errors import (
    CommandError,
    EnvironmentBuildError,
    HashMismatchError,
    NetworkError,
    ToolNotFoundError,
)
from envlock.locking.reqfile import locked_pins
from envlock.settings import Settings
from envlock.tools import pip as pip_tool
from envlock.tools import uv as uv_tool

_SEED_PACKAGES = ("pip", "setuptools", "wheel")


@dataclass(frozen=True)
class BuildEvent:
    """Progress of :meth:`EnvCache.ensure`.

    ``stage``: ``wait`` (another process builds this key), ``cleanup`` (a leftover was removed),
    ``interpreter``, ``warning``, ``venv``, ``install``, ``output`` (one line of the
    installer's output), ``done``.
    """

    stage: str
    message: str


Progress = Callable[[BuildEvent], None]


def emit(progress: Progress | None, stage: str, message: str) -> None:
    if progress is not None:
        progress(BuildEvent(stage, message))


def env_python(env_path: Path) -> Path:
    if os.name == "nt":
        return env_path / "Scripts" / "python.exe"
    return env_path / "bin" / "python"


def retarget_scripts(env_path: Path, old: Path, new: Path) -> None:
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


# --- uv, else pip ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uv:
    path: Path
    version: str


def find_uv_or_pip(settings: Settings, progress: Progress | None, *, doing: str,
                   installer: str = "auto") -> Uv | None:
    """uv (new enough), or None for pip: ``installer`` ``pip`` asks for pip; ``uv``, or an
    explicit ``ENVLOCK_UV``, makes a missing uv an error; otherwise a missing uv is a warning
    (``uv not found: {doing} with pip, which is slower``)."""
    if installer == "pip":
        return None
    try:
        uv = uv_tool.find_uv(settings.uv_path)
    except ToolNotFoundError:
        if installer == "uv" or settings.uv_path:
            raise
        emit(progress, "warning", f"uv not found: {doing} with pip, which is slower")
        return None
    have = uv_tool.version(uv)
    if uv_tool.version_tuple(have) < uv_tool.MIN_VERSION:
        need = ".".join(map(str, uv_tool.MIN_VERSION))
        raise EnvironmentBuildError(f"uv {have} at {uv} is too old (envlock needs {need} or newer)",
                                    hint="upgrade uv (`uv self update` or `pip install -U uv`)")
    return Uv(uv, have)


# --- an installer's failure, explained ------------------------------------------------------------


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
    from envlock.index.lookup import IndexClient

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


# --- the venv builder --------------------------------------------------------------------------


def _prompt(key: str) -> str:
    # Not the folder name, which during the build is the temporary one.
    return f"envlock-{key[:12]}"


class VenvBuild:
    """One build of ``spec`` into a folder (the fill function of ``EnvCache.build_into``):
    returns the marker fields that describe what it holds."""

    def __init__(self, spec: EnvSpec, settings: Settings, final: Path, progress: Progress | None, *,
                 installer: str = "auto") -> None:
        self.spec = spec
        self.settings = settings
        self.final = final
        self.progress = progress
        self.installer = installer
        self.offline = settings.offline if spec.offline is None else spec.offline

    def __call__(self, where: Path) -> Mapping[str, object]:
        spec, progress = self.spec, self.progress
        uv = find_uv_or_pip(self.settings, progress, doing="building", installer=self.installer)
        interp = find_python(spec.python_version, settings=self.settings,
                             allow_download=spec.allow_python_download,
                             on_warning=lambda msg: emit(progress, "warning", msg))
        emit(progress, "interpreter", f"Python {interp.version} at {interp.path} ({interp.source})")
        try:
            installer = self._uv(uv, interp.path, where) if uv else self._pip(interp.path, where)
        except CommandError as exc:
            unavailable = _hash_mismatch(exc) or _unavailable(exc, spec, self.settings, self.offline)
            if unavailable is None:
                raise
            raise unavailable from exc
        return {
            "python": interp.version,
            "python_requested": spec.python_version,
            "python_exact": interp.exact,
            "base_python": str(interp.path),
            "installer": installer,
        }

    def _line(self, line: str) -> None:
        emit(self.progress, "output", line)

    def _uv(self, uv: Uv, base: Path, tmp: Path) -> str:
        spec = self.spec
        emit(self.progress, "venv", f"creating a virtual environment with uv ({uv.path})")
        uv_tool.venv(uv.path, tmp, base, relocatable=True, prompt=_prompt(spec.key))
        emit(self.progress, "install", f"installing {spec.requirements_path.name} with uv")
        uv_tool.pip_sync(uv.path, env_python(tmp), spec.requirements_path,
                         require_hashes=spec.require_hashes, index_urls=self.settings.index_urls,
                         find_links=spec.find_links, offline=self.offline, no_index=spec.no_index,
                         on_line=self._line)
        return f"uv {uv.version}"

    def _pip(self, base: Path, tmp: Path) -> str:
        spec = self.spec
        try:
            base_pip: tuple[int, ...] | None = pip_tool.find_pip(base)
        except ToolNotFoundError:
            base_pip = None
        emit(self.progress, "venv", f"creating a virtual environment with {base} -m venv")
        if base_pip is not None and base_pip >= pip_tool.MIN_VERSION_FOR_TARGET:
            # The base interpreter's pip installs into the bare venv: no pip inside it.
            pip_tool.venv(base, tmp, with_pip=False, prompt=_prompt(spec.key))
            self._pip_install(base, env_python(tmp))
            version = ".".join(map(str, base_pip))
        else:
            # Seed pip into the venv, install, then take the seed packages out again.
            pip_tool.venv(base, tmp, with_pip=True, prompt=_prompt(spec.key))
            inner = pip_tool.find_pip(env_python(tmp))
            self._pip_install(env_python(tmp), None)
            locked = locked_pins(spec.requirements_path.read_text(encoding="utf-8"))
            pip_tool.uninstall(env_python(tmp), [p for p in _SEED_PACKAGES if p not in locked])
            version = ".".join(map(str, inner))
        retarget_scripts(tmp, tmp, self.final)
        return f"pip {version}"

    def _pip_install(self, pip_python: Path, target: Path | None) -> None:
        spec = self.spec
        emit(self.progress, "install", f"installing {spec.requirements_path.name} with pip")
        pip_tool.install(pip_python, spec.requirements_path, target_python=target,
                         require_hashes=spec.require_hashes, index_urls=self.settings.index_urls,
                         find_links=spec.find_links, offline=self.offline, no_index=spec.no_index,
                         timeout=self.settings.http_timeout, on_line=self._line)


__all__ = ["BuildEvent", "Progress", "Uv", "VenvBuild", "emit", "env_python", "find_uv_or_pip",
           "network_failure", "retarget_scripts"]
