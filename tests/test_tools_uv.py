"""envlock.tools.uv driving the real uv: discovery, venvs, hash-checked syncs, Python discovery."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from envlock.errors import CommandError, ToolNotFoundError
from envlock.settings import Settings
from envlock.tools import uv as uv_tool

DATA = Path(__file__).resolve().parent / "data"
SMALL_LOCK = DATA / "small.lock.txt"
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ENVLOCK_HOME", str(tmp_path / "home"))
    return Settings.from_env()


@pytest.fixture
def uv(settings: Settings) -> Path:
    try:
        return uv_tool.find_uv(settings.uv_path)
    except ToolNotFoundError as exc:
        pytest.skip(str(exc))


def _run(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def _only(lock_text: str, name: str) -> str:
    """The entry of one distribution out of a lock: its line and the indented hash lines."""
    m = re.search(rf"^{name}==.*?(?=^\S|\Z)", lock_text, flags=re.M | re.S)
    assert m, name
    return m.group(0)


def test_find_uv_default_is_the_one_beside_this_interpreter() -> None:
    beside = Path(sys.executable).parent / "uv"
    if not beside.exists():
        pytest.skip("uv is not installed next to this interpreter")
    assert uv_tool.find_uv(None) == beside


def test_find_uv_explicit_path_wins_and_a_wrong_one_fails(uv: Path, tmp_path: Path) -> None:
    assert uv_tool.find_uv(str(uv)) == uv
    with pytest.raises(ToolNotFoundError) as info:
        uv_tool.find_uv(str(tmp_path / "nope" / "uv"))
    assert info.value.exit_code == 3
    assert str(tmp_path / "nope" / "uv") in str(info.value)


def test_find_uv_from_env_var(uv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVLOCK_UV", str(uv))
    assert uv_tool.find_uv(Settings.from_env().uv_path) == uv


def test_find_uv_not_found_lists_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An interpreter with no uv beside it, nothing on PATH, an empty home, no uv package.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "uv", None)
    with pytest.raises(ToolNotFoundError) as info:
        uv_tool.find_uv(None)
    err = info.value
    assert err.tool == "uv"
    assert "PATH" in err.searched and str(tmp_path / ".local" / "bin") in err.searched
    assert err.hint and "pip install uv" in err.hint


def test_version(uv: Path) -> None:
    v = uv_tool.version(uv)
    assert re.fullmatch(r"\d+\.\d+\.\d+", v)
    assert uv_tool.version_tuple(v) >= uv_tool.MIN_VERSION


def test_venv_is_bare_and_sync_installs_exactly_the_lock(uv: Path, settings: Settings,
                                                         tmp_path: Path) -> None:
    env = tmp_path / "env"
    uv_tool.venv(uv, env, Path(sys.executable))
    assert (env / "pyvenv.cfg").read_text().count("relocatable = true") == 1
    python = env / "bin" / "python"
    assert _run(python, "import importlib.util as u; print(u.find_spec('pip'))") == "None"

    lines: list[str] = []
    uv_tool.pip_sync(uv, python, SMALL_LOCK, require_hashes=True, index_urls=settings.index_urls,
                     on_line=lines.append)
    assert _run(python, "import six, packaging; print(six.__version__, packaging.__version__)") \
        == "1.17.0 25.0"
    assert any("six==1.17.0" in line for line in lines)

    # A sync is exact: what the new lock does not name is removed.
    six_only = tmp_path / "six.lock.txt"
    six_only.write_text(_only(SMALL_LOCK.read_text(), "six"))
    uv_tool.pip_sync(uv, python, six_only, require_hashes=True, index_urls=settings.index_urls)
    assert _run(python, "import importlib.util as u; print(u.find_spec('packaging'))") == "None"


def test_a_wrong_hash_is_refused(uv: Path, settings: Settings, tmp_path: Path) -> None:
    env = tmp_path / "env"
    uv_tool.venv(uv, env, Path(sys.executable))
    bad = tmp_path / "bad.lock.txt"
    bad.write_text("six==1.17.0 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(CommandError) as info:
        uv_tool.pip_sync(uv, env / "bin" / "python", bad, require_hashes=True,
                         index_urls=settings.index_urls)
    assert info.value.returncode != 0
    assert "hash" in info.value.stderr_tail.lower()
    assert _run(env / "bin" / "python", "import importlib.util as u; print(u.find_spec('six'))") == "None"


def test_a_pin_without_hash_is_refused_when_hashes_are_required(uv: Path, settings: Settings,
                                                                tmp_path: Path) -> None:
    env = tmp_path / "env"
    uv_tool.venv(uv, env, Path(sys.executable))
    lock = tmp_path / "nohash.lock.txt"
    lock.write_text("six==1.17.0\n")
    with pytest.raises(CommandError):
        uv_tool.pip_sync(uv, env / "bin" / "python", lock, require_hashes=True,
                         index_urls=settings.index_urls)


def test_user_uv_configuration_is_ignored(uv: Path, settings: Settings, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # An index that does not exist, set the two ways a user could: env var and uv.toml.
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")
    (tmp_path / "uv.toml").write_text('index-url = "http://127.0.0.1:9/simple"\n')
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "small.lock.txt"  # uv runs in the lock's folder, next to uv.toml
    lock.write_text(SMALL_LOCK.read_text())
    env = tmp_path / "env"
    uv_tool.venv(uv, env, Path(sys.executable))
    uv_tool.pip_sync(uv, env / "bin" / "python", lock, require_hashes=True,
                     index_urls=settings.index_urls)
    assert _run(env / "bin" / "python", "import six; print(six.__version__)") == "1.17.0"


def test_python_find(uv: Path) -> None:
    here = uv_tool.python_find(uv, "3.5.1")
    assert here is None
    pyenv = PYENV_ROOT / "versions" / "3.11.7" / "bin" / "python3.11"
    if not pyenv.exists():
        pytest.skip("pyenv has no 3.11.7 here")
    found = uv_tool.python_find(uv, "3.11.7")
    if found is None:
        pytest.skip("uv's discovery cannot see 3.11.7 on this PATH")
    assert _run(found, "import platform; print(platform.python_version())") == "3.11.7"
    # A base interpreter, never a virtual environment (this test may run in one).
    assert _run(found, "import sys; print(sys.prefix == sys.base_prefix)") == "True"
