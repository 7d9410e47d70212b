"""Old experiments, for real: models saved in old stacks, run and checked from this host.

The main case is a Python 3.10 environment with tensorflow-cpu 2.15 (Keras 2), built once per
session with uv, with envlock installed into it from this checkout. A small model with a custom
layer is trained there and saved as .h5 and as a SavedModel folder, and `envlock save` runs
there. From this host (Python 3.11, the current TensorFlow with Keras 3) `envlock run` rebuilds
the 3.10 environment and must give the reference predictions bit for bit, and
`envlock check --strategy current` must explain why this host is not that environment.

Then: a vendored sidecar rebuilt with every index unreachable and an empty uv cache; the
Dockerfile and requirements exports (the latter installed with plain pip); a Keras 3 legacy .h5
from this host; and other stacks (Python 3.9 with TF 2.12, 3.12 with tf_keras under
TF_USE_LEGACY_KERAS=1, 3.13 with TF 2.20), each built once per session.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PROJECTS, requires_tf, run_cli
from test_vendor_export import check_dockerfile

from envlock.commands.export import export
from envlock.envs.inventory import compare_inventory, inventory
from envlock.locking.reqfile import locked_pins, read_requirements
from envlock.tools.uv import find_uv

pytestmark = [pytest.mark.slow, requires_tf]

REPO = Path(__file__).resolve().parents[1]
LEGACY = PROJECTS / "legacy"
# What a stack's subprocesses must not inherit from the test run (the dev venv's interpreter).
_STRIPPED = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_", "PIP_")


def base_python(minor: str) -> Path | None:
    """An installed CPython ``minor`` (e.g. "3.10"): pyenv's versions, then PATH."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for cand in sorted(root.glob(f"{minor}.*"), reverse=True):
        exe = cand / "bin" / f"python{minor}"
        if exe.is_file():
            return exe
    found = shutil.which(f"python{minor}")
    return Path(found) if found else None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra or {})
    return env


@dataclass
class Stack:
    """A virtual environment of an old stack with envlock installed into it."""

    name: str
    venv: Path
    env: dict[str, str] = field(default_factory=dict)  # e.g. TF_USE_LEGACY_KERAS=1

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *argv: str | os.PathLike[str], cwd: Path, env: Mapping[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean_env({**self.env, **(env or {})}),
                              capture_output=True, text=True, timeout=900)
        if check:
            assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr[-3000:]}"
        return done

    def envlock(self, *args: str, cwd: Path, env: Mapping[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
        return self.run(self.venv / "bin" / "envlock", *args, cwd=cwd, env=env)


def build_stack(root: Path, name: str, minor: str, packages: list[str],
                env: Mapping[str, str] | None = None) -> Stack:
    py = base_python(minor)
    if py is None:
        pytest.skip(f"no Python {minor} installed (pyenv install {minor})")
    uv = str(find_uv())
    venv = root / name
    stack = Stack(name, venv, dict(env or {}))
    stack.run(uv, "venv", "--no-config", "--python", py, venv, cwd=root)
    # envlock from this checkout, as a user installs it into the environment being captured.
    stack.run(uv, "pip", "install", "--no-config", "--python", stack.python, *packages, REPO, cwd=root)
    return stack


@dataclass
class Saved:
    model: Path
    stack: Stack

    @property
    def input(self) -> Path:
        return self.model.with_name(self.model.name + ".input.npy")

    @property
    def reference(self) -> np.ndarray:
        return np.load(self.model.with_name(self.model.name + ".reference.npy"))

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.model.with_name(self.model.name + ".envlock") / "envlock.json").read_text())


def train_and_save(stack: Stack, folder: Path, name: str, *save_args: str) -> Saved:
    """Train in the stack, then `envlock save` there, as the user did back then."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in LEGACY.glob("*.py"):
        shutil.copy(f, folder / f.name)
    stack.run(stack.python, "train.py", name, cwd=folder)
    saved = Saved(folder / name, stack)
    stack.envlock("save", name, "--custom-objects", "legacylayers", "--probe", saved.input.name, *save_args,
                  cwd=folder)
    return saved


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run_from_host(saved: Saved, out: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = run_cli("run", str(saved.model), "--input", str(saved.input), "--output", str(out), "--json",
                  *extra, cwd=saved.model.parent, env=env, timeout=900)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def interpreter_version(python: str | Path) -> str:
    return subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


# --- Python 3.10, TensorFlow 2.15, Keras 2 -------------------------------------------------------


@pytest.fixture(scope="session")
def tf215_models(tf215: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    folder = tmp_path_factory.mktemp("legacy-project")
    return {name: train_and_save(tf215, folder, name) for name in ("model.h5", "savedmodel")}


FORMATS = {"model.h5": "h5", "savedmodel": "savedmodel"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_sidecar_records_the_old_stack(tf215_models: dict[str, Saved], name: str) -> None:
    m = tf215_models[name].manifest
    assert m["python"]["version"].startswith("3.10.")
    assert m["model"]["format"] == FORMATS[name] and m["model"]["keras_version"] == "2.15.0"
    assert m["model"]["backend"] == "tensorflow"
    fw = m["framework"]
    assert fw["keras_major"] == 2 and fw["versions"]["tensorflow-cpu"] == "2.15.1"
    assert fw["versions"]["numpy"].startswith("1.")
    assert [(c["module"], c["qualname"], c["registered_name"]) for c in m["custom_objects"]] == [
        ("legacylayers", "Scale", "legacy>Scale")]
    assert m["weights"]["restored"] is True and len(m["weights"]["variables"]) == 5
    assert m["probe"]["repeat_bitwise_equal"] is True and m["warnings"] == []
    assert m["packages"]["complete"] is True


@pytest.mark.parametrize("name", list(FORMATS))
def test_run_from_a_keras3_host_rebuilds_the_310_env_bitwise(tf215_models: dict[str, Saved], name: str,
                                                              tmp_path: Path) -> None:
    saved = tf215_models[name]
    out = tmp_path / "predictions.npy"
    doc = run_from_host(saved, out)
    assert doc["strategy"] == "venv" and doc["validation"]["status"] == "identical"
    assert interpreter_version(doc["python"]) == saved.manifest["python"]["version"]
    assert platform.python_version() != saved.manifest["python"]["version"]
    assert bitwise_equal(np.load(out), saved.reference)


@pytest.mark.parametrize("name", list(FORMATS))
def test_check_current_on_the_host_names_keras_and_packages(tf215_models: dict[str, Saved],
                                                            name: str) -> None:
    saved = tf215_models[name]
    res = run_cli("check", str(saved.model), "--strategy", "current", "--json", cwd=saved.model.parent,
                  timeout=600)
    doc = json.loads(res.stdout)
    assert res.returncode == (0 if doc["status"] in ("identical", "within_tolerance") else 1), res.stderr
    assert doc["strategy"] == "current" and doc["error"] is None
    found = {f["code"]: f for f in doc["findings"]}
    assert {"keras_major_differs", "package_versions_differ"} <= set(found)
    keras = found["keras_major_differs"]
    assert keras["evidence"]["recorded"] == "2.15.0" and str(keras["evidence"]["current"]).startswith("3.")
    assert "tensorflow-cpu" in found["package_versions_differ"]["details"]["packages"]


# --- vendoring: no index at all ------------------------------------------------------------------


def test_vendored_sidecar_rebuilds_with_every_index_unreachable(tf215: Stack, tmp_path: Path) -> None:
    saved = train_and_save(tf215, tmp_path / "vendored", "model.h5", "--vendor")
    m = saved.manifest
    sidecar = saved.model.with_name("model.h5.envlock")
    pins = locked_pins((sidecar / "requirements.lock.txt").read_text())
    wheels = sorted(p.name for p in (sidecar / "wheels").iterdir())
    assert m["packages"]["vendored"]["complete"] is True and len(wheels) == len(pins)
    assert {f"wheels/{w}" for w in wheels} <= set(m["files"])  # hashed like every sidecar file
    assert any(w.startswith("tensorflow_cpu-2.15.1-cp310-cp310-manylinux") for w in wheels)

    home, uv_cache = tmp_path / "fresh-home", tmp_path / "empty-uv-cache"
    uv_cache.mkdir()
    nowhere = refused_url()
    env = {"ENVLOCK_HOME": str(home), "UV_CACHE_DIR": str(uv_cache), "UV_INDEX_URL": nowhere,
           "PIP_INDEX_URL": nowhere}
    out = tmp_path / "predictions.npy"
    # Another machine: nothing cached, and this sidecar's code/ is not trusted there yet.
    doc = run_from_host(saved, out, "--trust-code", env=env)
    assert doc["built"] is True and str(doc["env_path"]).startswith(str(home))
    assert doc["validation"]["status"] == "identical"
    assert bitwise_equal(np.load(out), saved.reference)
    assert any(uv_cache.iterdir())  # uv really worked from this empty cache


# --- exports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_exports_render_for_the_legacy_models(tf215_models: dict[str, Saved], name: str,
                                              tmp_path: Path) -> None:
    saved = tf215_models[name]
    version = saved.manifest["python"]["version"]
    docker = tmp_path / "Dockerfile"
    res = run_cli("export", str(saved.model), "--format", "dockerfile", "--output", str(docker))
    assert res.returncode == 0, res.stderr
    ins = check_dockerfile(docker.read_text(), saved.model.parent, name, version)
    assert ("COPY", f"{name} {name}") in ins and '"--trust-code"' in docker.read_text()
    text = export(saved.model, "requirements").text
    lock = saved.model.with_name(name + ".envlock") / "requirements.lock.txt"
    assert read_requirements(text) == read_requirements(lock.read_text())
    assert f"python{version.rsplit('.', 1)[0]} -m venv" in text


def test_requirements_export_installs_with_plain_pip_and_predicts(tf215_models: dict[str, Saved],
                                                                  tmp_path: Path) -> None:
    saved = tf215_models["model.h5"]
    reqs = tmp_path / "requirements.txt"
    export(saved.model, "requirements", output=reqs)
    base = base_python("3.10")
    assert base is not None
    venv = tmp_path / "plain"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, env=clean_env())
    py = venv / "bin" / "python"
    done = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           "-r", str(reqs)], capture_output=True, text=True, env=clean_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    diff = compare_inventory(inventory(py), locked_pins(reqs.read_text()), ignore=("pip",))
    assert diff.ok, diff
    # The environment plain pip built is the saved one: the model gives the same bits there.
    script = ("import sys, numpy as np, tensorflow as tf\nsys.path.insert(0, sys.argv[3])\n"
              "import legacylayers\nm = tf.keras.models.load_model(sys.argv[1], compile=False)\n"
              "np.save(sys.argv[2], m.predict(np.load(sys.argv[1] + '.input.npy'), verbose=0))\n")
    out = tmp_path / "plain.npy"
    subprocess.run([str(py), "-c", script, str(saved.model), str(out), str(saved.model.parent)],
                   check=True, env=clean_env(), capture_output=True, timeout=600)
    assert bitwise_equal(np.load(out), saved.reference)


# --- Keras 3 legacy .h5, saved on this host ------------------------------------------------------


def test_keras3_legacy_h5_from_this_host(tmp_path: Path) -> None:
    here = Stack("host", Path(sys.executable).parent.parent)
    folder = tmp_path / "k3"
    folder.mkdir()
    for f in LEGACY.glob("*.py"):
        shutil.copy(f, folder / f.name)
    here.run(sys.executable, "train.py", "model.h5", cwd=folder)
    res = run_cli("save", "model.h5", "--custom-objects", "legacylayers", "--probe", "model.h5.input.npy",
                  cwd=folder)
    assert res.returncode == 0, res.stderr
    saved = Saved(folder / "model.h5", here)
    m = saved.manifest
    assert m["model"]["format"] == "h5" and m["model"]["keras_version"].startswith("3.")
    assert m["framework"]["keras_major"] == 3
    doc = run_from_host(saved, tmp_path / "out.npy", "--strategy", "venv")
    assert doc["validation"]["status"] == "identical"
    assert bitwise_equal(np.load(tmp_path / "out.npy"), saved.reference)


# --- other stacks --------------------------------------------------------------------------------


STACKS: dict[str, tuple[str, list[str], dict[str, str], tuple[str, ...]]] = {
    # name: (python, packages, environment, model files)
    "py39-tf212": ("3.9", ["tensorflow-cpu==2.12.1"], {}, ("model.h5", "savedmodel")),
    # Keras 2 on a TensorFlow whose tf.keras is Keras 3: tf_keras, switched on by the variable.
    "py312-tf217-tf_keras": ("3.12", ["tensorflow-cpu==2.17.1", "tf-keras==2.17.0"],
                             {"TF_USE_LEGACY_KERAS": "1"}, ("model.h5", "savedmodel")),
    "py313-tf220": ("3.13", ["tensorflow-cpu==2.20.0"], {}, ("model.h5", "model.keras", "savedmodel")),
}


@pytest.fixture(scope="session")
def stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Saved]]:
    built: dict[str, dict[str, Saved]] = {}

    def get(name: str) -> dict[str, Saved]:
        if name not in built:
            minor, packages, env, files = STACKS[name]
            stack = build_stack(tmp_path_factory.mktemp("stacks"), name, minor, packages, env)
            folder = tmp_path_factory.mktemp(f"project-{name}")
            built[name] = {f: train_and_save(stack, folder, f) for f in files}
        return built[name]

    return get


@pytest.mark.parametrize("stack", list(STACKS))
def test_other_stacks_save_there_and_run_here_bitwise(stack_factory: Callable[[str], dict[str, Saved]],
                                                      stack: str, tmp_path: Path) -> None:
    minor, _, env, _ = STACKS[stack]
    for name, saved in stack_factory(stack).items():
        m = saved.manifest
        assert m["python"]["version"].startswith(minor + "."), name
        assert m["framework"]["legacy_keras"] is bool(env), name
        if env:
            assert m["determinism"]["env"]["TF_USE_LEGACY_KERAS"] == "1"
            assert m["framework"]["keras_module"] == "tf_keras" and m["framework"]["keras_major"] == 2
        out = tmp_path / f"{name}.npy"
        doc = run_from_host(saved, out)
        assert doc["validation"]["status"] == "identical", name
        assert interpreter_version(doc["python"]).startswith(minor + "."), name
        assert bitwise_equal(np.load(out), saved.reference), name
