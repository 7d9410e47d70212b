"""pip and the standard library's venv: the fallback when uv is not installed.

Slower than uv (no shared hardlinked cache) but needs nothing beyond a Python with pip.
Installs are hash-checked and ``--no-deps`` (the lock already names every distribution),
and ``--isolated`` keeps a user's pip.conf from changing what a lock installs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from envlock import proc
from envlock.errors import ToolNotFoundError
from envlock.tools.sources import index_options

# pip learnt `--python` (run against another interpreter's environment) in 22.3.
MIN_VERSION_FOR_TARGET = (22, 3)
# pip retries a failed request 5 times by default, with backoff: minutes for an index that
# never answers. With a timeout given, envlock bounds the retries too.
RETRIES = 2


def find_pip(python: Path) -> tuple[int, ...]:
    """The version of pip importable by ``python``; ToolNotFoundError when it has none."""
    done = proc.run([python, "-I", "-m", "pip", "--version"], check=False)
    m = re.match(r"pip (\d+(?:\.\d+)*)", done.stdout.strip())
    if done.returncode != 0 or not m:
        raise ToolNotFoundError(
            "pip", [f"{python} -m pip"],
            hint=f"install uv (`pip install uv`), or pip for {python} (`{python} -m ensurepip`)",
        )
    return tuple(int(p) for p in m.group(1).split("."))


def venv(python: Path, path: Path, *, with_pip: bool = False, prompt: str | None = None) -> None:
    """``python -m venv`` at ``path``; without pip unless asked (the lock decides what is in it)."""
    argv: list[str | os.PathLike[str]] = [python, "-I", "-m", "venv"]
    if not with_pip:
        argv.append("--without-pip")
    if prompt:
        argv += ["--prompt", prompt]
    argv.append(path)
    proc.run(argv, cwd=path.parent, what=f"could not create a virtual environment at {path}")


def install(
    pip_python: Path,
    requirements_path: Path,
    *,
    target_python: Path | None = None,
    require_hashes: bool,
    index_urls: Sequence[str] = (),
    find_links: Sequence[Path | str] = (),
    offline: bool = False,
    no_index: bool = False,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Install every pin of ``requirements_path`` (hash-checked, no dependency resolution).

    ``pip_python`` runs pip; ``target_python`` (pip >= 22.3) is the environment installed into
    when that is another one, which keeps pip itself out of a locked environment.
    pip has no offline switch: offline means ``--no-index`` (and ``find_links`` only).
    ``timeout`` (seconds, ENVLOCK_HTTP_TIMEOUT) bounds each request, and then the retries too.
    """
    requirements_path = requirements_path.absolute()
    argv: list[str | os.PathLike[str]] = [pip_python, "-I", "-m", "pip"]
    if target_python is not None:
        argv += ["--python", target_python]
    argv += ["install", "--isolated", "--no-input", "--disable-pip-version-check", "--no-deps",
             "--progress-bar", "off"]
    if require_hashes:
        argv.append("--require-hashes")
    if timeout is not None:
        argv += ["--timeout", f"{timeout:g}", "--retries", str(RETRIES)]
    argv += index_options(index_urls, find_links, no_index=no_index or offline)
    argv += ["-r", requirements_path]
    # pip reports progress on stdout; its stderr holds warnings and errors.
    proc.run(
        argv,
        cwd=requirements_path.parent,
        what=f"pip could not install {requirements_path.name}",
        on_stderr_line=on_line,
    )


def uninstall(pip_python: Path, names: Iterable[str]) -> None:
    """Remove ``names`` from the environment of ``pip_python`` (the seed pip/setuptools)."""
    names = list(names)
    if names:
        proc.run([pip_python, "-I", "-m", "pip", "uninstall", "--yes", "--isolated", *names],
                 what="pip could not remove the seed packages")
