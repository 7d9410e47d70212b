"""uv: the fast path for building locked environments.

Driven through its command line only. Every call passes ``--no-config`` so that a user's
``uv.toml`` cannot change what a lock installs; the index URLs come from
:class:`envlock.settings.Settings` instead. The user's uv cache (``UV_CACHE_DIR`` or uv's
default) is kept, so every environment hardlinks from one shared cache: a rebuild of a
TensorFlow environment whose wheels are cached takes about a second.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from envlock import proc
from envlock.errors import CommandError, ToolNotFoundError
from envlock.tools import exe_name
from envlock.tools.sources import index_options

# uv's own variables are stripped by proc.clean_env (a stray UV_INDEX_URL must not change
# what a lock installs); these only say where uv keeps things or how it reaches the network.
PASSTHROUGH_ENV = (
    "UV_CACHE_DIR",
    "UV_PYTHON_INSTALL_DIR",
    "UV_NATIVE_TLS",
    "UV_SYSTEM_CERTS",
    "UV_HTTP_TIMEOUT",
    "UV_LINK_MODE",
    "UV_CONCURRENT_DOWNLOADS",
    "UV_CONCURRENT_INSTALLS",
)

# `uv venv --relocatable` appeared in 0.2.31; envlock needs it (see envs/build.py).
MIN_VERSION = (0, 4, 0)

_INSTALL_HINT = "install uv (`pip install uv`, or see https://docs.astral.sh/uv/), or set ENVLOCK_UV"


def find_uv(explicit: str | None = None) -> Path:
    """Find the uv executable.

    An explicit path (``--uv`` / ``ENVLOCK_UV``, i.e. ``Settings.uv_path``) is used or fails;
    otherwise: next to ``sys.executable`` (where the ``uv`` PyPI package puts it), ``PATH``,
    ``~/.local/bin``, ``~/.cargo/bin`` and the ``uv`` package's ``find_uv_bin()``.
    """
    if explicit:
        cand = Path(explicit).expanduser()
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
        on_path = shutil.which(explicit)
        if on_path:
            return Path(on_path)
        raise ToolNotFoundError("uv", [explicit], hint="check the path given by --uv or ENVLOCK_UV")

    searched: list[str] = []
    # Not resolved: in a venv sys.executable is a symlink whose directory is the venv's bin.
    beside = Path(sys.executable).parent / exe_name("uv")
    searched.append(str(beside.parent))
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    searched.append("PATH")
    on_path = shutil.which("uv")
    if on_path:
        return Path(on_path)
    for known in (Path.home() / ".local" / "bin", Path.home() / ".cargo" / "bin"):
        searched.append(str(known))
        cand = known / exe_name("uv")
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    searched.append("the uv Python package")
    try:
        import uv as uv_package  # the PyPI `uv` package, not this module
    except ImportError:
        pass
    else:
        try:
            return Path(uv_package.find_uv_bin())
        except (FileNotFoundError, AttributeError):
            pass
    raise ToolNotFoundError("uv", searched, hint=_INSTALL_HINT)


def uv_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment uv runs in: clean, but keeping where the user's uv cache lives."""
    return proc.clean_env(keep=PASSTHROUGH_ENV, base=base)


def version(uv: Path) -> str:
    """uv's version, e.g. ``"0.13.9"``."""
    out = proc.run([uv, "--version"], env=uv_env(), what="uv --version").stdout.strip()
    m = re.search(r"(\d+(?:\.\d+)+)", out)
    if not m:
        raise CommandError([str(uv), "--version"], 0, out, what="could not read uv's version")
    return m.group(1)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def venv(uv: Path, path: Path, python: Path, *, relocatable: bool = True,
         prompt: str | None = None) -> None:
    """Create a bare virtual environment (no pip, no setuptools) at ``path`` for ``python``.

    ``relocatable`` makes the activation scripts and the console scripts uv installs later
    find their interpreter relative to themselves, so the folder can be renamed after it
    is built. ``bin/python`` is a symlink to the base interpreter, which a rename does not
    touch, and ``pyvenv.cfg`` names only the base interpreter's directory.
    """
    argv: list[str | os.PathLike[str]] = [
        uv, "venv", "--no-config", "--no-project", "--no-python-downloads", "--color", "never",
        "--python", python,
    ]
    if relocatable:
        argv.append("--relocatable")
    if prompt:
        argv += ["--prompt", prompt]
    argv.append(path)
    proc.run(argv, env=uv_env(), cwd=path.parent, what=f"uv could not create a virtual environment at {path}")


def _install_options(*, require_hashes: bool, index_urls: Sequence[str],
                     find_links: Sequence[Path | str], offline: bool, no_index: bool) -> list[str]:
    """The hash, index and offline flags shared by ``uv pip sync`` and ``uv pip install``."""
    opts = ["--require-hashes"] if require_hashes else []
    opts += index_options(index_urls, find_links, no_index=no_index)
    if not no_index and len(index_urls) > 1 and require_hashes:
        opts += ["--index-strategy", "unsafe-best-match"]
    if offline:
        opts.append("--offline")
    return opts


def _uv_pip(uv: Path, command: Sequence[str], python: Path, requirements_path: Path, options: list[str],
            on_line: Callable[[str], None] | None) -> None:
    requirements_path = requirements_path.absolute()
    argv: list[str | os.PathLike[str]] = [
        uv, "pip", command[0], "--no-config", "--no-python-downloads", "--color", "never",
        "--python", python, *command[1:], *options, requirements_path,
    ]
    proc.run(argv, env=uv_env(), cwd=requirements_path.parent,
             what=f"uv could not install {requirements_path.name}", on_stderr_line=on_line)


def pip_sync(uv: Path, python: Path, requirements_path: Path, *, require_hashes: bool,
             index_urls: Sequence[str] = (), find_links: Sequence[Path | str] = (), offline: bool = False,
             no_index: bool = False, on_line: Callable[[str], None] | None = None) -> None:
    """Make the environment of ``python`` hold exactly what ``requirements_path`` pins.

    ``index_urls``: the first is the default index, the others extra indexes. With hashes
    required, uv may pick a file from any index (``unsafe-best-match``, pip's behaviour):
    the hash check is what rules out a look-alike package on another index, and it lets a
    lock that mixes PyPI with e.g. a PyTorch index install at all. No ``--compile-bytecode``:
    measured on a TensorFlow lock it turns a 0.8 s sync into 5.9 s, while compiling lazily
    on the first import costs about 1.2 s once.
    """
    _uv_pip(uv, ["sync"], python, requirements_path,
            _install_options(require_hashes=require_hashes, index_urls=index_urls, find_links=find_links,
                             offline=offline, no_index=no_index), on_line)


def pip_install(uv: Path, python: Path, requirements_path: Path, *, require_hashes: bool,
                index_urls: Sequence[str] = (), find_links: Sequence[Path | str] = (), offline: bool = False,
                no_index: bool = False, on_line: Callable[[str], None] | None = None) -> None:
    """Add exactly what ``requirements_path`` pins to the environment of ``python``, with
    ``--no-deps`` and without removing anything: for the pip part of a conda environment,
    where ``pip sync`` would take out what conda installed. Index options as in :func:`pip_sync`.
    """
    _uv_pip(uv, ["install", "--no-deps"], python, requirements_path,
            [*_install_options(require_hashes=require_hashes, index_urls=index_urls, find_links=find_links,
                               offline=offline, no_index=no_index), "-r"], on_line)


def python_find(uv: Path, version: str) -> Path | None:
    """uv's own interpreter discovery for ``version``; None when uv finds none.

    ``--system`` keeps virtual environments (a ``.venv`` in the working directory, say)
    out: an environment is built from a base interpreter. uv can fail outright on a broken
    PATH entry (a pyenv shim for a version that is not active); that counts as not found.
    """
    argv: list[str | os.PathLike[str]] = [
        uv, "python", "find", "--system", "--no-config", "--no-project", "--no-python-downloads",
        "--color", "never", version,
    ]
    done = proc.run(argv, env=uv_env(), cwd=Path.home(), check=False)
    if done.returncode != 0:
        return None
    line = done.stdout.strip().splitlines()
    return Path(line[-1]) if line else None


def python_install(uv: Path, version: str, *, on_line: Callable[[str], None] | None = None) -> None:
    """Download a managed CPython ``version`` with ``uv python install`` (only when allowed)."""
    proc.run(
        [uv, "python", "install", "--no-config", "--color", "never", version],
        env=uv_env(),
        cwd=Path.home(),
        what=f"uv could not install Python {version}",
        on_stderr_line=on_line,
    )
