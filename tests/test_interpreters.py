"""Interpreter discovery against the real interpreters of this machine (pyenv, PATH)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from envlock.envs.interpreters import Interpreter, find_python
from envlock.errors import EnvironmentBuildError, InterpreterNotFoundError
from envlock.settings import Settings

PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
PYENV_312 = PYENV_ROOT / "versions" / "3.12.1" / "bin" / "python3.12"
PYENV_310 = PYENV_ROOT / "versions" / "3.10.13" / "bin" / "python3.10"

needs_312 = pytest.mark.skipif(not PYENV_312.exists(), reason="pyenv has no 3.12.1 here")
needs_310 = pytest.mark.skipif(not PYENV_310.exists(), reason="pyenv has no 3.10.13 here")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ENVLOCK_HOME", str(tmp_path / "home"))
    return Settings.from_env()


def _isolated(tmp_path: Path, **env: str) -> Settings:
    """Settings that see only what a test lays out: no uv, no pyenv, an empty PATH."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    environ = {"PATH": str(empty), "PYENV_ROOT": str(empty), "HOME": str(empty), **env}
    return Settings(home=tmp_path / "home", config_dir=tmp_path / "config",
                    uv_path=str(tmp_path / "no-uv-here"), environ=environ)


def _version_of(path: Path) -> str:
    return subprocess.run([str(path), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_current_interpreter_is_found_first(settings: Settings) -> None:
    found = find_python(platform.python_version(), settings=settings)
    assert found.source == "current"
    assert found.exact
    assert found.version == platform.python_version()
    # A venv's base interpreter, the one an environment is built from.
    assert _version_of(found.path) == platform.python_version()
    assert Path(sys.base_prefix) in found.path.resolve().parents


@needs_312
def test_finds_another_minor_through_pyenv_or_uv(settings: Settings) -> None:
    assert not platform.python_version().startswith("3.12.")
    found = find_python("3.12.1", settings=settings)
    assert found == Interpreter(path=found.path, version="3.12.1", source=found.source, exact=True)
    assert found.source in {"uv", "pyenv"}
    assert _version_of(found.path) == "3.12.1"


@needs_312
def test_pyenv_alone_finds_it(tmp_path: Path) -> None:
    found = find_python("3.12.1", settings=_isolated(tmp_path, PYENV_ROOT=str(PYENV_ROOT)))
    assert (found.source, found.version, found.exact) == ("pyenv", "3.12.1", True)
    assert found.path.parent.parent == PYENV_ROOT / "versions" / "3.12.1"


@needs_312
def test_minor_only_request_takes_any_patch(settings: Settings) -> None:
    found = find_python("3.12", settings=settings)
    assert found.exact and found.version.startswith("3.12.")


@needs_312
def test_same_minor_other_patch_is_accepted_with_a_warning(settings: Settings) -> None:
    warnings: list[str] = []
    found = find_python("3.12.99", settings=settings, on_warning=warnings.append)
    assert found.version == "3.12.1"
    assert not found.exact
    assert len(warnings) == 1
    assert "3.12.99" in warnings[0] and "3.12.1" in warnings[0]


def test_missing_version_names_the_version_and_the_places(settings: Settings) -> None:
    with pytest.raises(InterpreterNotFoundError) as info:
        find_python("3.5.1", settings=settings)
    err = info.value
    assert isinstance(err, EnvironmentBuildError) and err.exit_code == 3
    assert err.version == "3.5.1"
    assert "3.5.1" in str(err)
    joined = " ".join(err.searched)
    for place in ("current interpreter", "uv", "versions", "PATH", "conda"):
        assert place in joined
    assert err.hint and "3.5.1" in err.hint


def test_nothing_is_downloaded_unless_allowed(settings: Settings, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    managed = tmp_path / "uv-python"  # passed through to uv: where a download would land
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(managed))
    with pytest.raises(InterpreterNotFoundError):
        find_python("3.5.1", settings=settings, allow_download=False)
    assert not managed.exists()


@needs_312
def test_a_folder_name_is_not_trusted_the_version_is_run(tmp_path: Path) -> None:
    # A pyenv-like folder that claims 3.12.7 but holds 3.12.1: found, but as another patch.
    fake = tmp_path / "pyenv" / "versions" / "3.12.7"
    (fake / "lib" / "python3.12").mkdir(parents=True)
    (fake / "bin").mkdir()
    (fake / "bin" / "python3.12").symlink_to(PYENV_312)
    warnings: list[str] = []
    found = find_python("3.12.7", settings=_isolated(tmp_path, PYENV_ROOT=str(tmp_path / "pyenv")),
                        on_warning=warnings.append)
    assert (found.version, found.exact, found.source) == ("3.12.1", False, "pyenv")
    assert warnings


def test_a_broken_candidate_is_skipped(tmp_path: Path) -> None:
    fake = tmp_path / "pyenv" / "versions" / "3.5.1"
    (fake / "lib" / "python3.5").mkdir(parents=True)
    (fake / "bin").mkdir()
    script = fake / "bin" / "python3.5"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(InterpreterNotFoundError):
        find_python("3.5.1", settings=_isolated(tmp_path, PYENV_ROOT=str(tmp_path / "pyenv")))


@needs_310
def test_python_x_y_on_path(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3.10").symlink_to(PYENV_310)
    s = _isolated(tmp_path)
    found = find_python("3.10.13", settings=s.with_(environ={**s.environ, "PATH": str(bindir)}))
    assert (found.source, found.version, found.exact) == ("PATH", "3.10.13", True)


@needs_310
def test_conda_prefix_and_envs(tmp_path: Path) -> None:
    # A conda layout (base + envs/*) whose env holds a real 3.10 interpreter.
    root = tmp_path / "miniforge"
    env = root / "envs" / "py310"
    (env / "lib" / "python3.10").mkdir(parents=True)
    (env / "bin").mkdir()
    (env / "bin" / "python").symlink_to(PYENV_310)
    (root / "bin").mkdir(parents=True)
    found = find_python("3.10.13", settings=_isolated(tmp_path, MAMBA_ROOT_PREFIX=str(root)))
    assert (found.source, found.version, found.exact) == ("conda", "3.10.13", True)
    assert found.path == env / "bin" / "python"


def test_system_python_on_path_if_present(settings: Settings) -> None:
    system = shutil.which("python3.11", path="/usr/bin")
    if system is None:
        pytest.skip("no /usr/bin/python3.11")
    want = _version_of(Path(system))
    if want == platform.python_version():
        pytest.skip("the system Python is the current one")
    found = find_python(want, settings=settings)
    assert found.exact and found.version == want
    assert found.source in {"uv", "PATH"}
