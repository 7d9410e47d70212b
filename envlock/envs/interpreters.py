"""Finding a Python interpreter of the version a lock records.

Looked for, in this order: the current interpreter, uv's discovery, pyenv
(``$PYENV_ROOT/versions/*``), ``pythonX.Y`` on ``PATH``, and conda installs (base and
``envs/*``). Every candidate but the current interpreter is run once to read its real
version, so a misnamed folder or a broken shim cannot pass. The exact version wins at once;
the same minor with another patch is accepted with a warning; anything else is an
:class:`InterpreterNotFoundError`. Nothing is downloaded unless the caller allows it.

Only CPython with the GIL is accepted: a lock's wheels are ``cp3XX`` builds, which a
free-threaded (``cp313t``) or PyPy interpreter cannot load.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from envlock import proc
from envlock.errors import CommandError, InterpreterNotFoundError, ToolNotFoundError
from envlock.settings import Settings
from envlock.tools import uv as uv_tool

# Runs on any Python 3 (the candidate may be old): prints what decides whether it fits.
_PROBE = (
    "import json, platform, sys, sysconfig;"
    "print(json.dumps({'version': platform.python_version(),"
    " 'implementation': sys.implementation.name,"
    " 'free_threaded': bool(sysconfig.get_config_var('Py_GIL_DISABLED'))}))"
)
_PROBE_TIMEOUT = 30.0

CONDA_ROOTS = ("~/miniconda3", "~/miniforge3", "~/mambaforge", "~/anaconda3", "~/micromamba", "/opt/conda")


@dataclass(frozen=True)
class Interpreter:
    """A base interpreter to build an environment from.

    ``source`` says where it was found: ``current``, ``uv``, ``pyenv``, ``PATH``, ``conda`` or
    ``download``. ``exact`` is False when only the minor version matches the request.
    """

    path: Path
    version: str
    source: str
    exact: bool


@dataclass(frozen=True)
class _Request:
    text: str
    major: int
    minor: int
    patch: int | None  # None: "3.12" asks for any 3.12

    @classmethod
    def parse(cls, text: str) -> _Request:
        parts = text.strip().split(".")
        try:
            nums = [int(p) for p in parts[:3]]
        except ValueError:
            raise InterpreterNotFoundError(text, []) from None
        if len(nums) < 2:
            raise InterpreterNotFoundError(text, [])
        return cls(text.strip(), nums[0], nums[1], nums[2] if len(nums) > 2 else None)

    @property
    def minor_text(self) -> str:
        return f"{self.major}.{self.minor}"

    def same_minor(self, version: str) -> bool:
        return version.split(".")[:2] == [str(self.major), str(self.minor)]

    def is_exact(self, version: str) -> bool:
        if not self.same_minor(version):
            return False
        return self.patch is None or version == self.text

    def distance(self, version: str) -> tuple[int, int]:
        """Sort key for same-minor candidates: the nearest patch, then the newer one."""
        try:
            patch = int("".join(c for c in version.split(".")[2] if c.isdigit()) or 0)
        except IndexError:
            patch = 0
        want = self.patch if self.patch is not None else 10_000
        return (abs(want - patch), -patch)


def _environ(settings: Settings) -> Mapping[str, str]:
    return settings.environ or os.environ


def _ask(path: Path) -> dict[str, object] | None:
    """What the interpreter at ``path`` says about itself, or None when it is no Python."""
    try:
        done = proc.run([path, "-I", "-c", _PROBE], timeout=_PROBE_TIMEOUT, check=False)
    except CommandError:
        return None
    if done.returncode != 0:
        return None
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return info if isinstance(info, dict) and "version" in info else None


def python_version(path: Path) -> str | None:
    """The version of the Python (any implementation) at ``path``; None when it is not a Python
    that answers, e.g. ``/bin/true`` or a script that is not an interpreter."""
    info = _ask(path)
    return None if info is None else str(info["version"])


def _probe(path: Path) -> str | None:
    """The version of the CPython at ``path``, or None when it is not one we can build from."""
    info = _ask(path)
    if info is None or info.get("implementation") != "cpython" or info.get("free_threaded"):
        return None
    return str(info.get("version"))


def _current() -> Path:
    # In a venv, build from its base interpreter (what pyvenv.cfg points at), not the venv.
    base = getattr(sys, "_base_executable", None)
    if base and Path(base).is_file():
        return Path(base)
    return Path(sys.executable)


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _prefix_python(prefix: Path, req: _Request) -> Path | None:
    """The interpreter of an install prefix, when it holds ``lib/pythonX.Y`` (a cheap pre-check)."""
    if not (prefix / "lib" / f"python{req.minor_text}").is_dir():
        return None
    for name in (f"python{req.minor_text}", f"python{req.major}", "python"):
        cand = prefix / "bin" / name
        if _is_exe(cand):
            return cand
    return None


def _pyenv_root(env: Mapping[str, str]) -> Path:
    return Path(env.get("PYENV_ROOT") or Path.home() / ".pyenv").expanduser()


def _pyenv(req: _Request, env: Mapping[str, str]) -> Iterator[Path]:
    versions = _pyenv_root(env) / "versions"
    if not versions.is_dir():
        return
    # The folder named exactly as asked first: usually the one.
    dirs = sorted(versions.iterdir(), key=lambda d: (d.name != req.text, d.name))
    for d in dirs:
        found = _prefix_python(d, req)
        if found is not None:
            yield found


def _on_path(req: _Request, env: Mapping[str, str]) -> Iterator[Path]:
    # pyenv's shims only forward to the versions searched above, and fail for inactive ones.
    pyenv_root = str(_pyenv_root(env))
    for entry in (env.get("PATH") or "").split(os.pathsep):
        if not entry or entry.startswith(pyenv_root):
            continue
        cand = Path(entry) / f"python{req.minor_text}"
        if _is_exe(cand):
            yield cand


def _conda_prefixes(env: Mapping[str, str]) -> list[Path]:
    roots: list[Path] = []
    for var in ("CONDA_PREFIX", "MAMBA_ROOT_PREFIX"):
        if env.get(var):
            roots.append(Path(env[var]))
    if env.get("CONDA_EXE"):  # .../bin/conda -> the base install
        roots.append(Path(env["CONDA_EXE"]).parent.parent)
    roots += [Path(r).expanduser() for r in CONDA_ROOTS]
    prefixes: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        prefixes.append(root)
        envs = root / "envs"
        if envs.is_dir():
            prefixes += sorted(p for p in envs.iterdir() if p.is_dir())
    return list(dict.fromkeys(prefixes))


def _conda(req: _Request, env: Mapping[str, str]) -> Iterator[Path]:
    for prefix in _conda_prefixes(env):
        found = _prefix_python(prefix, req)
        if found is not None:
            yield found


@dataclass
class _Search:
    """The candidates looked at so far: each real path once, the same-minor ones kept as a
    fallback, and the places searched (for the "not found" error)."""

    req: _Request
    searched: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    near: list[Interpreter] = field(default_factory=list)

    def consider(self, path: Path, source: str, known_version: str | None = None) -> Interpreter | None:
        """The interpreter at ``path`` when it is the exact version asked for."""
        try:
            key = os.path.realpath(path)
        except OSError:
            return None
        if key in self.seen:
            return None
        self.seen.add(key)
        found = known_version or _probe(path)
        if found is None or not self.req.same_minor(found):
            return None
        interp = Interpreter(path=path, version=found, source=source, exact=self.req.is_exact(found))
        if interp.exact:
            return interp
        self.near.append(interp)
        return None

    def first(self, where: str, source: str, candidates: Iterable[Path]) -> Interpreter | None:
        self.searched.append(where)
        for cand in candidates:
            if hit := self.consider(cand, source):
                return hit
        return None

    def nearest(self, on_warning: Callable[[str], None] | None) -> Interpreter:
        """The same-minor candidate with the nearest patch, with a warning; else not found."""
        if not self.near:
            raise InterpreterNotFoundError(self.req.text, self.searched)
        best = min(self.near, key=lambda i: self.req.distance(i.version))
        _warn(on_warning,
              f"Python {self.req.text} not found; using {best.version} ({best.path}, from {best.source}): "
              f"same minor version, another patch")
        return best


def find_python(
    version: str,
    *,
    settings: Settings,
    allow_download: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> Interpreter:
    """Find CPython ``version`` ("3.12.1"; "3.12" takes any patch) to build an environment from."""
    req = _Request.parse(version)
    env = _environ(settings)
    search = _Search(req)

    current = _current()
    search.searched.append(f"the current interpreter ({platform.python_version()})")
    if platform.python_implementation() == "CPython" \
            and (hit := search.consider(current, "current", platform.python_version())):
        return hit

    uv: Path | None
    try:
        uv = uv_tool.find_uv(settings.uv_path)
    except ToolNotFoundError:
        uv = None
    if uv is not None and (hit := search.first("uv's interpreter discovery", "uv", _found_by_uv(uv, req))):
        return hit
    if hit := search.first(str(_pyenv_root(env) / "versions"), "pyenv", _pyenv(req, env)):
        return hit
    if hit := search.first(f"python{req.minor_text} on PATH", "PATH", _on_path(req, env)):
        return hit
    if hit := search.first("conda (" + ", ".join(["$CONDA_PREFIX", *CONDA_ROOTS]) + ")", "conda",
                           _conda(req, env)):
        return hit

    if allow_download and (downloaded := _download(uv, req, on_warning)) is not None:
        search.seen.discard(os.path.realpath(downloaded))
        if hit := search.consider(downloaded, "download"):
            return hit
    return search.nearest(on_warning)


def _found_by_uv(uv: Path, req: _Request) -> Iterator[Path]:
    found = uv_tool.python_find(uv, req.text)
    if found is not None:
        yield found


def _download(uv: Path | None, req: _Request, on_warning: Callable[[str], None] | None) -> Path | None:
    """Install ``req`` with uv and return its path; None (with a warning) when that fails."""
    if uv is None:
        _warn(on_warning, f"cannot download Python {req.text}: uv is not installed")
        return None
    try:
        uv_tool.python_install(uv, req.text)
    except CommandError as exc:
        _warn(on_warning, f"could not download Python {req.text}: {exc}")
        return None
    return uv_tool.python_find(uv, req.text)


def _warn(cb: Callable[[str], None] | None, message: str) -> None:
    if cb is not None:
        cb(message)
