"""conda, mamba, micromamba and conda-lock: driven through their command lines.

Two discovery functions, one per tool: :func:`find_conda` (any of conda, mamba, micromamba:
they take the same ``create --file`` arguments) and :func:`find_conda_lock`. Each takes an
explicit path first (``ENVLOCK_CONDA`` / ``ENVLOCK_CONDA_LOCK``), then the places the tool
announces or usually lives in, then fails with what it searched.

``proc.clean_env`` strips ``CONDA_*`` so that an activated environment cannot redirect an
install; only where the package cache and the configuration live are passed through.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from envlock import proc
from envlock.envs.interpreters import CONDA_ROOTS
from envlock.errors import ToolNotFoundError
from envlock.tools import exe_name

PASSTHROUGH_ENV = ("CONDA_PKGS_DIRS", "CONDARC", "MAMBA_ROOT_PREFIX", "MAMBARC", "SSL_CERT_FILE",
                   "REQUESTS_CA_BUNDLE")
# micromamba first: one static binary, no base environment to consult, and the fastest.
FLAVOURS = ("micromamba", "mamba", "conda")
_INSTALL_HINT = ("install micromamba, mamba or conda, or set ENVLOCK_CONDA; without any of them "
                 "envlock installs with py-rattler (`pip install 'envlock[conda]'`)")


@dataclass(frozen=True)
class CondaExe:
    path: Path
    flavour: str  # micromamba, mamba or conda


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _flavour(path: Path) -> str:
    name = path.name.lower()
    return next((f for f in FLAVOURS if name.startswith(f)), "conda")


def tool_env() -> dict[str, str]:
    return proc.clean_env(keep=PASSTHROUGH_ENV)


def _explicit(tool: str, explicit: str | None, variable: str) -> Path | None:
    """The tool at the path (or command name) the user gave; None when none was given."""
    if not explicit:
        return None
    cand = Path(explicit).expanduser()
    found = str(cand) if _usable(cand) else shutil.which(explicit)
    if found:
        return Path(found)
    raise ToolNotFoundError(tool, [explicit], hint=f"check the path given by {variable}")


def find_conda(explicit: str | None = None, *, environ: Mapping[str, str] | None = None) -> CondaExe:
    """A conda-compatible installer: ``explicit`` (or ``ENVLOCK_CONDA``), then ``MAMBA_EXE`` /
    ``CONDA_EXE`` (set by an activated shell), ``PATH`` (micromamba, mamba, conda), and the
    usual install roots."""
    env = os.environ if environ is None else environ
    given = _explicit("conda", explicit or env.get("ENVLOCK_CONDA"), "ENVLOCK_CONDA")
    if given is not None:
        return CondaExe(given, _flavour(given))
    searched: list[str] = []
    for var in ("MAMBA_EXE", "CONDA_EXE"):
        value = env.get(var)
        searched.append(f"${var}")
        if value and _usable(Path(value)):
            return CondaExe(Path(value), _flavour(Path(value)))
    searched.append("PATH")
    for flavour in FLAVOURS:
        on_path = shutil.which(flavour)
        if on_path:
            return CondaExe(Path(on_path), flavour)
    for root in (*CONDA_ROOTS, "~/.local"):
        base = Path(root).expanduser()
        searched.append(str(base))
        for flavour in FLAVOURS:
            for sub in ("bin", "condabin", "Scripts", "Library/bin"):
                cand = base / sub / exe_name(flavour)
                if _usable(cand):
                    return CondaExe(cand, flavour)
    raise ToolNotFoundError("conda", searched, hint=_INSTALL_HINT)


def find_conda_lock(explicit: str | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """conda-lock: ``explicit`` (or ``ENVLOCK_CONDA_LOCK``), next to ``sys.executable``,
    ``PATH``, then ``~/.local/bin`` (where pipx puts it)."""
    env = os.environ if environ is None else environ
    given = _explicit("conda-lock", explicit or env.get("ENVLOCK_CONDA_LOCK"), "ENVLOCK_CONDA_LOCK")
    if given is not None:
        return given
    beside = Path(sys.executable).parent / exe_name("conda-lock")
    searched = [str(beside.parent), "PATH", "~/.local/bin"]
    if _usable(beside):
        return beside
    on_path = shutil.which("conda-lock")
    if on_path:
        return Path(on_path)
    known = Path.home() / ".local" / "bin" / exe_name("conda-lock")
    if _usable(known):
        return known
    raise ToolNotFoundError("conda-lock", searched,
                            hint="install it on its own: `pipx install conda-lock` "
                                 "(or `uv tool install conda-lock`)")


def version(exe: Path) -> str:
    done = proc.run([exe, "--version"], env=tool_env(), check=False)
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[-1].split()[-1] if text else "unknown"


def conda_lock_install(conda_lock: Path, conda: CondaExe, lockfile: Path, prefix: Path, *,
                       on_line: Callable[[str], None] | None = None) -> None:
    """``conda-lock install --prefix PREFIX LOCKFILE`` with ``conda`` as the installer. It renders
    an explicit list (every file by URL and md5) and creates the prefix from it: no solver."""
    proc.run([conda_lock, "install", "--conda", conda.path, "--prefix", prefix, lockfile],
             env=tool_env(), cwd=lockfile.parent, on_stderr_line=on_line,
             what=f"conda-lock could not install {lockfile.name} into {prefix}")


def create_explicit(conda: CondaExe, explicit: Path, prefix: Path, *,
                    on_line: Callable[[str], None] | None = None) -> None:
    """``<conda> create --yes --prefix PREFIX --file EXPLICIT``: the files listed, no solver."""
    proc.run([conda.path, "create", "--yes", "--prefix", prefix, "--file", explicit],
             env=tool_env(), cwd=explicit.parent, on_stderr_line=on_line,
             what=f"{conda.flavour} could not create {prefix} from {explicit.name}")


def conda_lock_render(conda_lock: Path, lockfile: Path, out_dir: Path, *, kind: str = "explicit",
                      platform: str | None = None) -> list[Path]:
    """``conda-lock render --kind KIND``: the files it wrote into ``out_dir``."""
    argv: list[str | os.PathLike[str]] = [conda_lock, "render", "--kind", kind,
                                          "--filename-template", str(out_dir / "rendered-{platform}")]
    if platform:
        argv += ["--platform", platform]
    argv.append(lockfile)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc.run(argv, env=tool_env(), cwd=out_dir, what=f"conda-lock could not render {lockfile.name}")
    return sorted(p for p in out_dir.iterdir() if p.name.startswith("rendered-"))


__all__ = ["CondaExe", "conda_lock_install", "conda_lock_render", "create_explicit", "find_conda",
           "find_conda_lock", "tool_env", "version"]
