"""The ``conda`` strategy: rebuild a sidecar's conda environment in the environment cache.

The conda packages go in exactly as locked (no solver), then the pip part, hash-checked with
``--no-deps``, through uv (pip when uv is missing). Installers, in order:

* ``conda-lock install`` when conda-lock and conda, mamba or micromamba are found (with a
  conda but no conda-lock: ``conda create --file`` on the rendered ``@EXPLICIT`` list, which
  is what conda-lock runs too);
* otherwise py-rattler (:mod:`envlock.tools.rattler`): no conda needed on the machine.

``ENVLOCK_CONDA_INSTALLER`` (``auto``, ``conda``, ``rattler``) picks one by hand.

Same cache as venvs (:class:`envlock.envs.cache.EnvCache`): one prefix per lock key, the key's
file lock, the marker written last. py-rattler writes into ``.tmp-<key>-…`` while patching the
*final* path into the files (``alternative_target_prefix``), so the prefix is renamed into
place like a venv; the console scripts uv writes name the build folder and are pointed at the
final path before the marker goes in. conda has no such option (it writes the prefix it
installs into into the files it links), so with conda the prefix is built in place; until the
marker is written it does not count, and a build cut short is removed as a leftover.

Before the marker, ``conda-meta/`` is compared with the lock: the prefix must hold exactly
the locked records.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from envlock.envs.build import Progress, emit, env_python, find_uv_or_pip, retarget_scripts
from envlock.envs.cache import Env, EnvCache
from envlock.envs.key import canonical_lock
from envlock.errors import EnvironmentBuildError, SidecarError, ToolNotFoundError
from envlock.locking import condalock, condarender
from envlock.locking.condalock import CondaLock
from envlock.locking.reqfile import HASH_RE, all_hashed, locked_pins, locked_requirements
from envlock.settings import Settings
from envlock.tools import conda as conda_tool
from envlock.tools import pip as pip_tool
from envlock.tools import rattler as rattler_tool
from envlock.tools import uv as uv_tool

CONDA_KEY_SCHEMA = 1
INSTALLERS = ("auto", "conda", "rattler")
@dataclass(frozen=True)
class CondaSpec:
    """What to build: the lock, the pip part as a hashed requirements text, and its key."""

    key: str
    lock: CondaLock
    pip_requirements: str
    require_hashes: bool
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    offline: bool | None = None

    @classmethod
    def from_sidecar(cls, sc: Any, *, find_links: Sequence[str] = ()) -> CondaSpec:
        """The sidecar's conda lock; its ``wheels/`` (``--vendor``) is a find-links folder, and
        when it holds every file, the pip part is installed from it alone (no index)."""
        lock = condalock.from_sidecar(sc)
        if lock is None:
            raise EnvironmentBuildError(
                "the conda strategy needs a conda-lock.yml in the sidecar; this sidecar was captured "
                "outside conda", hint="use --strategy venv")
        reqs = sc.file("requirements.lock.txt")
        text = pip_requirements(lock, reqs.read_text(encoding="utf-8") if reqs.is_file() else "")
        wheels = sc.file("wheels")
        links = (*find_links, *((str(wheels),) if wheels.is_dir() else ()))
        vendored = wheels.is_dir() and bool(sc.get("packages", "vendored", "complete"))
        return cls(key=conda_key(lock, text), lock=lock, pip_requirements=text,
                   require_hashes=all_hashed(text) or not lock.pip,
                   find_links=tuple(links), no_index=vendored, offline=True if vendored else None)


def _locked_lines(requirements_text: str) -> dict[str, str]:
    """``{canonical name: requirement line}`` from requirements.lock.txt (continuations joined)."""
    return {str(canonicalize_name(req.name)): line
            for req, line in locked_requirements(requirements_text)}


def pip_requirements(lock: CondaLock, requirements_text: str = "") -> str:
    """The pip part, one requirement per line. Each is the sidecar's requirements.lock.txt line
    for that distribution when the version matches: every file hash of the release (the
    installer may pick another wheel of it on this machine), or ``name @ url`` for a direct
    archive. Else what conda-lock.yml records: ``name==version`` and the installed file's hash."""
    locked = _locked_lines(requirements_text)
    pins = locked_pins(requirements_text)
    lines = ["# The pip part of a conda environment, written by envlock (installed with --no-deps)."]
    for p in sorted(lock.pip, key=lambda p: p.name):
        line = locked.get(p.name)
        direct = line is not None and " @ " in HASH_RE.sub("", line)
        if line is not None and (direct or pins.get(p.name) == p.version) and HASH_RE.search(line):
            lines.append(line)
        else:
            lines.append(f"{p.name}=={p.version}" + (f" --hash=sha256:{p.sha256}" if p.sha256 else ""))
    return "\n".join(lines) + "\n"


def conda_key(lock: CondaLock, pip_text: str) -> str:
    """sha256 of the exact conda files (by md5/sha256), the pip part and the platform."""
    doc = {
        "schema": CONDA_KEY_SCHEMA,
        "kind": "conda",
        "platform": lock.platform,
        "conda": sorted([p.name, p.version, p.build, p.fn, p.md5, p.sha256 or ""] for p in lock.conda),
        "pip": canonical_lock(pip_text),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_platform(lock: CondaLock) -> None:
    here = condalock.this_platform()
    if lock.platform != here:
        raise EnvironmentBuildError(
            f"conda-lock.yml is for {lock.platform}; this machine is {here}",
            hint=f"rebuild on a {lock.platform} machine, or save the model again on this one")


# --- what is in a prefix ---------------------------------------------------------------------


def installed_records(prefix: Path) -> dict[str, tuple[str, str, str, str]]:
    """``{file name: (name, version, build, md5)}`` from ``prefix/conda-meta``."""
    out: dict[str, tuple[str, str, str, str]] = {}
    meta = prefix / "conda-meta"
    if not meta.is_dir():
        return out
    for path in meta.glob("*.json"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("name"):
            fn = str(doc.get("fn") or condalock._basename(str(doc.get("url", ""))))
            out[fn] = (str(doc["name"]), str(doc.get("version")), str(doc.get("build")), str(doc.get("md5")))
    return out


def locked_records(lock: CondaLock) -> dict[str, tuple[str, str, str, str]]:
    return {p.fn: (p.name, p.version, p.build, p.md5) for p in lock.conda}


def records_differ(prefix: Path, lock: CondaLock) -> list[str]:
    """What keeps ``prefix`` from holding exactly the locked conda records (empty: nothing)."""
    have, want = installed_records(prefix), locked_records(lock)
    problems = [f"missing {fn}" for fn in sorted(set(want) - set(have))]
    problems += [f"not locked {fn}" for fn in sorted(set(have) - set(want))]
    problems += [f"different {fn}" for fn in sorted(set(want) & set(have)) if want[fn] != have[fn]]
    return problems


# --- building --------------------------------------------------------------------------------


def _installer(choice: str, settings: Settings) -> tuple[str, Any]:
    if choice not in INSTALLERS:
        raise EnvironmentBuildError(
            f"unknown conda installer {choice!r} (choose from {', '.join(INSTALLERS)})")
    if choice in ("auto", "conda"):
        try:
            conda = conda_tool.find_conda(environ=settings.environ or None)
        except ToolNotFoundError:
            if choice == "conda":
                raise
        else:
            try:
                return "conda-lock", (conda_tool.find_conda_lock(environ=settings.environ or None), conda)
            except ToolNotFoundError:
                return "conda", conda
    try:
        return "rattler", rattler_tool.find_rattler()
    except ToolNotFoundError:
        raise ToolNotFoundError("py-rattler, conda, mamba or micromamba", [
            "import rattler", "$ENVLOCK_CONDA", "$MAMBA_EXE", "$CONDA_EXE", "PATH"],
            hint=rattler_tool.INSTALL_HINT) from None


class _Build:
    """One build of ``spec`` into ``where`` (the fill function of EnvCache.build_into)."""

    def __init__(self, spec: CondaSpec, settings: Settings, installer: tuple[str, Any],
                 final: Path, progress: Progress | None) -> None:
        self.spec = spec
        self.settings = settings
        self.kind, self.tool = installer
        self.final = final
        self.progress = progress

    def __call__(self, where: Path) -> Mapping[str, object]:
        lock = self.spec.lock
        with tempfile.TemporaryDirectory(prefix="envlock-conda-") as scratch:
            work = Path(scratch)
            n = len(lock.conda)
            if self.kind == "rattler":
                emit(self.progress, "conda",
                      f"installing {n} conda packages with py-rattler {self.tool.version}")
                rattler_tool.install(self.tool, [p.record for p in lock.conda], where, final=self.final)
                conda_installer = f"py-rattler {self.tool.version}"
            elif self.kind == "conda-lock":
                conda_lock, conda = self.tool
                only = work / "conda-lock.yml"
                only.write_text(condalock.dumps(CondaLock(lock.platform, lock.channels, lock.conda, ())),
                                encoding="utf-8")
                emit(self.progress, "conda",
                      f"installing {n} conda packages with conda-lock ({conda.flavour})")
                conda_tool.conda_lock_install(conda_lock, conda, only, where, on_line=self._line)
                conda_installer = f"conda-lock {conda_tool.version(conda_lock)} + {conda.flavour}"
            else:
                conda = self.tool
                explicit = work / f"conda-{lock.platform}.lock"
                explicit.write_text(condarender.render_explicit(lock), encoding="utf-8")
                emit(self.progress, "conda", f"installing {n} conda packages with {conda.flavour}")
                conda_tool.create_explicit(conda, explicit, where, on_line=self._line)
                conda_installer = f"{conda.flavour} {conda_tool.version(conda.path)}"
            pip_installer = self._pip_part(where, work) if lock.pip else None
        if where != self.final:
            retarget_scripts(where, where, self.final)
        problems = records_differ(where, lock)
        if problems:
            raise EnvironmentBuildError(
                f"the conda prefix does not hold exactly the locked packages: {'; '.join(problems[:5])}")
        python = lock.python
        return {
            "kind": "conda",
            "platform": lock.platform,
            "python": python.version if python else "",
            "python_requested": python.version if python else "",
            "python_exact": True,
            "base_python": python.url if python else "",
            "installer": conda_installer + (f" + {pip_installer}" if pip_installer else ""),
        }

    def _line(self, line: str) -> None:
        emit(self.progress, "output", line)

    def _pip_part(self, where: Path, work: Path) -> str:
        spec = self.spec
        reqs = work / "pip-part.txt"
        reqs.write_text(spec.pip_requirements, encoding="utf-8")
        python = env_python(where)
        offline = self.settings.offline if spec.offline is None else spec.offline
        emit(self.progress, "install", f"installing the pip part ({len(spec.lock.pip)} distributions)")
        uv = find_uv_or_pip(self.settings, self.progress, doing="installing the pip part")
        if uv is None:
            pip_tool.install(Path(sys.executable), reqs, target_python=python,
                             require_hashes=spec.require_hashes, index_urls=self.settings.index_urls,
                             find_links=spec.find_links, offline=offline, no_index=spec.no_index,
                             timeout=self.settings.http_timeout, on_line=self._line)
            return "pip"
        uv_tool.pip_install(uv.path, python, reqs, require_hashes=spec.require_hashes,
                            index_urls=self.settings.index_urls, find_links=spec.find_links,
                            offline=offline, no_index=spec.no_index, on_line=self._line)
        return f"uv {uv.version}"


def ensure_conda_env(spec: CondaSpec, settings: Settings, *, progress: Progress | None = None,
                     installer: str | None = None, lock_timeout: float | None = None) -> Env:
    """The cached prefix for ``spec``: found, or built all or nothing under the key's lock."""
    check_platform(spec.lock)
    if spec.lock.python is None:
        raise SidecarError("conda-lock.yml", "the lock has no python package: nothing to run the model with")
    cache = EnvCache(settings)

    def build(final: Path) -> Env:
        # Only when there is something to build: a cached prefix needs no tool at all.
        chosen = _installer(installer or settings.environ.get("ENVLOCK_CONDA_INSTALLER", "auto"), settings)
        return cache.build_into(spec.key, _Build(spec, settings, chosen, final, progress),
                                in_place=chosen[0] != "rattler", progress=progress)

    return cache.ensure_key(spec.key, build, progress=progress, lock_timeout=lock_timeout)


def current_matches(sc: Any, prefix: Path) -> bool:
    """Whether the conda prefix we run in holds exactly the sidecar's conda records."""
    lock = condalock.from_sidecar(sc)
    return lock is not None and condalock.is_conda_prefix(prefix) and not records_differ(prefix, lock)


__all__ = ["CondaSpec", "check_platform", "conda_key", "current_matches", "ensure_conda_env",
           "installed_records", "pip_requirements", "records_differ"]
