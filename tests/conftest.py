"""Shared fixtures: one envlock home per session (the index cache warms once), the test
project (a real model with custom objects, trained in a subprocess), helpers to run the CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
PROJECTS = HERE / "projects"


def load_localindex() -> ModuleType:
    """tests/data/index/localindex.py (a local package index server), loaded once by path."""
    name = "envlock_test_localindex"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "data" / "index" / "localindex.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def _has_tf() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorflow") is not None and find_spec("keras") is not None


requires_tf = pytest.mark.skipif(not _has_tf(), reason="TensorFlow is not installed here")


@pytest.fixture(scope="session", autouse=True)
def envlock_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ENVLOCK_HOME for the session; uv's own cache is left shared, on purpose."""
    home = tmp_path_factory.mktemp("envlock-home")
    old = os.environ.get("ENVLOCK_HOME")
    os.environ["ENVLOCK_HOME"] = str(home)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    yield home
    if old is None:
        os.environ.pop("ENVLOCK_HOME", None)
    else:
        os.environ["ENVLOCK_HOME"] = old


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> CliResult:
    """The real console entry point in a subprocess, as a user runs it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "envlock", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_python(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    full_env = dict(os.environ)
    full_env.update(env or {})
    subprocess.run([sys.executable, script, *args], cwd=cwd, env=full_env, check=True,
                   capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/projects/tiny with model.keras trained in it (custom layer in a module)."""
    if not _has_tf():
        pytest.skip("TensorFlow is not installed here")
    root = tmp_path_factory.mktemp("tiny")
    for f in (PROJECTS / "tiny").iterdir():
        if f.is_file():
            shutil.copy(f, root / f.name)
    run_python("train.py", "model.keras", cwd=root)
    return root


@pytest.fixture(scope="session")
def saved_tiny(tiny_project: Path) -> Path:
    """tiny_project's model.keras with its sidecar written by the real CLI."""
    res = run_cli("save", "model.keras", cwd=tiny_project)
    assert res.returncode == 0, res.stderr
    return tiny_project / "model.keras"


# --- environments several test files share, built once per session ---------------------------------
# (A fixture imported into a test module is another fixture there: defined here, each is built once.)


@pytest.fixture(scope="session")
def tf215(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Python 3.10 venv with tensorflow-cpu 2.15 (Keras 2) and envlock from this checkout."""
    from test_legacy import build_stack

    return build_stack(tmp_path_factory.mktemp("stacks"), "py310-tf215", "3.10", ["tensorflow-cpu==2.15.1"])


def envlock_host_venv(tmp_path_factory: pytest.TempPathFactory, name: str, extras: str = "") -> Path:
    """A venv with envlock installed from this checkout (``extras`` e.g. "[ray]"), as a user
    installs it on a host, and no TensorFlow. Its folder."""
    from test_run import ROOT, UV, _env

    if UV is None:
        pytest.skip("uv is not installed")
    venv = tmp_path_factory.mktemp(name) / "venv"
    subprocess.run([UV, "venv", "-q", str(venv), "--python", sys.executable], check=True,
                   capture_output=True, timeout=300)
    subprocess.run([UV, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), f"{ROOT}{extras}"],
                   check=True, capture_output=True, timeout=900, env=_env())
    return venv


@pytest.fixture(scope="session")
def host_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with envlock installed from this checkout (a wheel, no extras): no TensorFlow."""
    return envlock_host_venv(tmp_path_factory, "host")
