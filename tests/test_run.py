"""envlock run / envlock.load for real: rebuilt environments, worker processes, bad inputs.

Every prediction is compared bit for bit with ``model.predict(x, batch_size=32)`` run in the
environment the model was saved in. Environments are built from the model's own lock with uv
(its shared cache makes that take seconds); a fresh ENVLOCK_HOME makes a cache cold, while the
trust list (ENVLOCK_CONFIG_DIR) stays the session's, as it does for a user clearing the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECTS, CliResult, requires_tf, run_cli

import envlock
from envlock.errors import InputArrayError

pytestmark = [requires_tf, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                              reason="uses /proc and POSIX signals")]

ROOT = Path(__file__).resolve().parent.parent
DEV_BIN = Path(sys.executable).parent
UV = shutil.which("uv", path=str(DEV_BIN)) or shutil.which("uv")
ROWS = 100  # not a multiple of 32: the last batch is a short one
BIG_ROWS = 1_000_000  # seconds of predict for the tiny model, whatever the machine
# `python -c PREDICT_SCRIPT PROJECT MODEL IN OUT [IN OUT ...]`, in the environment of the model.
PREDICT_SCRIPT = """\
import sys
import keras
import numpy as np
sys.path.insert(0, sys.argv[1])
import tinylayers  # noqa: F401  (registers the custom objects)
model = keras.models.load_model(sys.argv[2])
for i in range(3, len(sys.argv), 2):
    np.save(sys.argv[i + 1], model.predict(np.load(sys.argv[i]), batch_size=32, verbose=0))
"""


# --- helpers ------------------------------------------------------------------------------------


def _env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with an own envlock cache; trust stays the session's."""
    env = dict(os.environ)
    session_home = Path(os.environ["ENVLOCK_HOME"])
    env["ENVLOCK_CONFIG_DIR"] = os.environ.get("ENVLOCK_CONFIG_DIR", str(session_home / "config"))
    if home is not None:
        env["ENVLOCK_HOME"] = str(home)
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def _envlock(python: Path | str, *args: str, env: dict[str, str], cwd: Path | None = None,
             timeout: float = 600) -> CliResult:
    p = subprocess.run([str(python), "-m", "envlock", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


def _popen(*args: str, env: dict[str, str], python: Path | str = sys.executable) -> subprocess.Popen[str]:
    return subprocess.Popen([str(python), "-m", "envlock", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _json(res: CliResult) -> dict:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr}"
    return json.loads(res.stdout)


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _envs(home: Path) -> dict[str, list[str]]:
    root = home / "envs"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return {"complete": [n for n in names if not n.startswith(".") and (root / n).is_dir()],
            "leftovers": [n for n in names if n.startswith((".tmp-", ".trash-"))]}


def _one_error(stderr: str) -> str:
    """stderr is one ``envlock: error:`` line, optionally followed by one ``  hint:`` line."""
    lines = stderr.splitlines()
    assert len(lines) in (1, 2), stderr
    assert lines[0].startswith("envlock: error: "), stderr
    if len(lines) == 2:
        assert lines[1].startswith("  hint: "), stderr
    return lines[0]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing paren.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _worker_of(pid: int) -> int | None:
    for kid in _children(pid):
        try:
            cmdline = (Path("/proc") / str(kid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"envlock_worker" in cmdline:
            return kid
    return None


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str,
                timeout: float = 120, every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"envlock ended (exit {proc.returncode}) before {what}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory, saved_tiny: Path) -> Path:
    """x.npy and ref.npy = model.predict(x, batch_size=32) in the environment the model was saved
    in; likewise f64.npy and i64.npy (float64 and int64 inputs, which Keras casts to float32)."""
    d = tmp_path_factory.mktemp("run-data")
    rng = np.random.default_rng(7)
    np.save(d / "x.npy", rng.standard_normal((ROWS, 4)).astype("float32"))
    np.save(d / "f64.npy", rng.standard_normal((40, 4)))
    np.save(d / "i64.npy", rng.integers(-3, 3, size=(40, 4)))
    pairs = [str(d / n) for n in ("x.npy", "ref.npy", "f64.npy", "f64.ref.npy", "i64.npy", "i64.ref.npy")]
    subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(saved_tiny.parent), str(saved_tiny), *pairs],
                   check=True, capture_output=True, timeout=300)
    return d


@pytest.fixture(scope="session")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("run-big") / "big.npy"
    np.save(p, np.random.default_rng(1).standard_normal((BIG_ROWS, 4)).astype("float32"))
    return p


# --- 1. a host without TensorFlow -----------------------------------------------------------------


def test_host_without_tensorflow_rebuilds_the_environment_and_reuses_it(
        host_venv: Path, saved_tiny: Path, data: Path, tmp_path: Path) -> None:
    py = host_venv / "bin" / "python"
    # Not from the checkout's folder, which `python -c` would put on sys.path.
    for module in ("tensorflow", "keras"):
        probe = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True,
                               cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
    where = subprocess.run([str(py), "-c", "import envlock; print(envlock.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(host_venv), "envlock must come from the host venv, not the checkout"

    home = tmp_path / "home"
    env = _env(home, ENVLOCK_UV=str(UV))  # uv is not in the host venv (no extras)
    cmd = [str(host_venv / "bin" / "envlock"), "run", str(saved_tiny), "--input", str(data / "x.npy"),
           "--json"]
    first = subprocess.run([*cmd, "--output", str(tmp_path / "y1.npy")], env=env, capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    doc = _json(CliResult(first.returncode, first.stdout, first.stderr))
    assert doc["schema"] == "envlock.run/1"
    assert doc["strategy"] == "venv" and doc["built"] is True
    env_path = Path(doc["env_path"])
    assert env_path.parent == home / "envs" and Path(doc["python"]) == env_path / "bin" / "python"
    assert doc["validation"]["status"] == "identical"
    assert doc["rows"] == ROWS
    assert _bitwise_equal(np.load(tmp_path / "y1.npy"), np.load(data / "ref.npy"))

    # What an install would touch: the folder (renamed into place), site-packages, the marker.
    site = next(env_path.glob("lib/python*/site-packages"))
    before = (env_path.stat().st_ino, site.stat().st_mtime_ns,
              json.loads((env_path / ".envlock-complete").read_text())["created"])
    second = subprocess.run([*cmd, "--output", str(tmp_path / "y2.npy")], env=env, capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    doc2 = _json(CliResult(second.returncode, second.stdout, second.stderr))
    assert doc2["strategy"] == "venv" and doc2["built"] is False and doc2["env_path"] == str(env_path)
    after = (env_path.stat().st_ino, site.stat().st_mtime_ns,
             json.loads((env_path / ".envlock-complete").read_text())["created"])
    assert after == before
    assert _envs(home) == {"complete": [env_path.name], "leftovers": []}
    assert _bitwise_equal(np.load(tmp_path / "y2.npy"), np.load(data / "ref.npy"))


# --- 2. a model saved under Python 3.12, run from this 3.11 host ----------------------------------


PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
PY312 = PYENV_ROOT / "versions" / "3.12.1" / "bin" / "python3.12"


@pytest.fixture(scope="session")
def saved_on_312(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path]:
    """tests/projects/tiny trained and saved by `envlock save` in a Python 3.12 venv holding the
    dev venv's TensorFlow and Keras; returns the model and that venv's own predictions of x."""
    if UV is None or not PY312.exists():
        pytest.skip(f"needs uv and {PY312}")
    root = tmp_path_factory.mktemp("py312")
    venv = root / "venv"
    py = venv / "bin" / "python"
    subprocess.run([UV, "venv", "-q", str(venv), "--python", str(PY312)], check=True, capture_output=True,
                   timeout=300)
    pins = [f"tensorflow-cpu=={metadata.version('tensorflow-cpu')}", f"keras=={metadata.version('keras')}"]
    subprocess.run([UV, "pip", "install", "-q", "--python", str(py), *pins, str(ROOT)], check=True,
                   capture_output=True, timeout=1200, env=_env())
    project = root / "tiny"
    project.mkdir()
    for f in (PROJECTS / "tiny").iterdir():
        if f.is_file():
            shutil.copy(f, project / f.name)
    env = _env()
    subprocess.run([str(py), "train.py", "model.keras"], cwd=project, env=env, check=True,
                   capture_output=True, timeout=600)
    saved = subprocess.run([str(venv / "bin" / "envlock"), "save", "model.keras"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=600)
    assert saved.returncode == 0, saved.stderr
    own = root / "own.npy"
    subprocess.run([str(py), "-c", PREDICT_SCRIPT, str(project), str(project / "model.keras"),
                    str(data / "x.npy"), str(own)], check=True, capture_output=True, timeout=600)
    return project / "model.keras", own


@pytest.mark.slow
def test_model_saved_on_python_312_runs_from_a_311_host(saved_on_312: tuple[Path, Path], data: Path,
                                                         tmp_path: Path) -> None:
    model, own = saved_on_312
    manifest = json.loads((model.parent / "model.keras.envlock" / "envlock.json").read_text())
    assert manifest["python"]["version"] == "3.12.1"
    assert sys.version_info[:2] == (3, 11)

    home = tmp_path / "home"
    out = tmp_path / "y.npy"
    doc = _json(run_cli("run", str(model), "--input", str(data / "x.npy"), "--output", str(out),
                        "--json", env=_env(home)))
    assert doc["strategy"] == "venv" and doc["built"] is True
    env_python = Path(doc["python"])
    base = Path(os.path.realpath(env_python))
    assert base.is_relative_to(PY312.parent.parent), f"{env_python} -> {base}, not pyenv's 3.12.1"
    version = subprocess.run([str(env_python), "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "3.12.1"
    marker = json.loads((Path(doc["env_path"]) / ".envlock-complete").read_text())
    assert marker["python"] == "3.12.1" and marker["python_exact"] is True
    assert doc["validation"]["status"] == "identical"
    assert _bitwise_equal(np.load(out), np.load(own))


# --- 3. concurrent runs on a cold cache, a build killed half-way -----------------------------------


def test_four_concurrent_runs_build_once(saved_tiny: Path, data: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home)
    procs = [_popen("run", str(saved_tiny), "--input", str(data / "x.npy"), "--output",
                    str(tmp_path / f"y{i}.npy"), "--strategy", "venv", "--json", env=env)
             for i in range(4)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        docs.append(_json(CliResult(p.returncode, out, err)))
    assert sorted(d["built"] for d in docs) == [False, False, False, True]
    assert len({d["env_path"] for d in docs}) == 1
    assert _envs(home) == {"complete": [Path(docs[0]["env_path"]).name], "leftovers": []}
    ref = np.load(data / "ref.npy")
    for i in range(4):
        assert _bitwise_equal(np.load(tmp_path / f"y{i}.npy"), ref)
    # The workers imported tinylayers from the sidecar's code/, through a private copy:
    # running leaves the sidecar exactly as saved.
    assert not list((saved_tiny.parent / "model.keras.envlock").rglob("__pycache__"))


def test_build_killed_with_sigkill_leaves_nothing_that_looks_complete(
        saved_tiny: Path, data: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home)
    envs = home / "envs"

    def installing() -> bool:
        # The venv exists inside the build folder: uv is installing the lock into it.
        return envs.is_dir() and any((p / "pyvenv.cfg").exists() for p in envs.glob(".tmp-*"))

    p = _popen("env", str(saved_tiny), "--strategy", "venv", "--json", env=env)
    try:
        _wait_until(installing, p, "the build started")
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    killed = _envs(home)
    assert killed["complete"] == [] and killed["leftovers"], killed

    out = tmp_path / "y.npy"
    doc = _json(run_cli("run", str(saved_tiny), "--input", str(data / "x.npy"), "--output", str(out),
                        "--strategy", "venv", "--json", env=env))
    assert doc["built"] is True and doc["validation"]["status"] == "identical"
    assert _bitwise_equal(np.load(out), np.load(data / "ref.npy"))
    assert _envs(home) == {"complete": [Path(doc["env_path"]).name], "leftovers": []}


# --- 4. bad inputs and failing workers ------------------------------------------------------------


def _write_bad(case: str, folder: Path) -> Path:
    rows = np.zeros((10, 4), "float32")
    if case == "wrong_shape":
        np.save(folder / "x.npy", np.zeros((10, 5), "float32"))
    elif case == "complex":
        np.save(folder / "x.npy", rows.astype("complex128"))
    elif case == "strings":
        np.save(folder / "x.npy", np.full((10, 4), "hello", dtype="<U5"))
    elif case == "pickled_objects":
        np.save(folder / "x.npy", rows.astype(object), allow_pickle=True)
    elif case == "npz_without_input_key":
        np.savez(folder / "x.npz", other=rows, extra=rows)
    elif case == "corrupt_npz":
        (folder / "x.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    elif case == "not_npy":
        (folder / "x.npy").write_text("features\n1,2,3,4\n")
    elif case in ("bad_output_suffix", "missing_output_folder"):
        np.save(folder / "x.npy", rows)
    elif case != "missing_input":
        raise AssertionError(case)
    return folder / ("x.npz" if "npz" in case else "x.npy")


BAD_INPUTS = {
    "wrong_shape": "input features has shape (10, 5); the model expects (None, 4)",
    "complex": "dtype complex128, which cannot be cast safely to float32",
    "strings": "dtype <U5, which cannot be cast safely to float32",
    "pickled_objects": "holds Python objects",
    "npz_without_input_key": "has no array for input(s) features (it has other, extra)",
    "corrupt_npz": "not a readable .npz file",
    "not_npy": "not a .npy array",
    "missing_input": "no such file",
    "bad_output_suffix": "the output must be a .npy or .npz file",
    "missing_output_folder": "does not exist",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: str, saved_tiny: Path,
                                                              tmp_path: Path) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    x = _write_bad(case, inputs)
    out = outputs / {"bad_output_suffix": "y.txt", "missing_output_folder": "nope/y.npy"}.get(case, "y.npy")
    before = sorted(p.name for p in inputs.iterdir())
    res = run_cli("run", str(saved_tiny), "--input", str(x), "--output", str(out), env=_env())
    assert res.returncode == 2, res.stderr
    assert BAD_INPUTS[case] in _one_error(res.stderr)
    assert res.stdout == ""
    assert list(outputs.iterdir()) == []
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_worker_killed_mid_predict_exits_4(saved_tiny: Path, big_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "y.npy"
    out.parent.mkdir()
    p = _popen("run", str(saved_tiny), "--input", str(big_input), "--output", str(out),
               "--strategy", "current", "--quiet", env=_env())
    try:
        # The host makes its scratch folder beside the output right before it sends predict.
        _wait_until(lambda: any(out.parent.iterdir()), p, "the prediction started")
        worker = _worker_of(p.pid)
        assert worker is not None, "no worker process under envlock"
        time.sleep(0.3)
        assert p.poll() is None, "the prediction ended before the worker could be killed"
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 4, stderr
    assert "the worker was killed by SIGKILL" in _one_error(stderr)
    assert stdout == ""
    assert list(out.parent.iterdir()) == []


def test_timeout_stops_a_slow_predict_with_exit_4(saved_tiny: Path, big_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "y.npy"
    out.parent.mkdir()
    p = _popen("run", str(saved_tiny), "--input", str(big_input), "--output", str(out),
               "--strategy", "current", "--timeout", "5", "--quiet", env=_env())
    try:
        _wait_until(lambda: _worker_of(p.pid) is not None, p, "the worker started", every=0.05)
        worker = _worker_of(p.pid)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 4, stderr
    assert "did not answer in time" in _one_error(stderr)
    assert "--timeout" in stderr.splitlines()[-1]
    assert stdout == ""
    assert list(out.parent.iterdir()) == []
    assert worker is not None and not _alive(worker)


# --- 5. the Python API ------------------------------------------------------------------------------


def test_load_as_context_manager_predicts_the_cli_bits(saved_tiny: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "y.npy"
    doc = _json(run_cli("run", str(saved_tiny), "--input", str(data / "x.npy"), "--output", str(out),
                        "--json", env=_env()))
    assert doc["strategy"] == "current"  # the dev venv is the environment the model was saved in
    x = np.load(data / "x.npy")
    with envlock.load(str(saved_tiny)) as session:
        assert session.client is not None and _alive(session.client.pid or 0)
        worker = session.client.pid
        y = session.predict(x)
        # Rows 0-6 alone are another batch than rows 0-6 of a 32-row batch (kernels may sum in
        # another order): compare them with the CLI's prediction of the same 7 rows.
        again = session.predict(x[:7])
        # same_kind casting: float64 and int64 become float32, as Keras itself casts them.
        cast = {n: session.predict(np.load(data / f"{n}.npy")) for n in ("f64", "i64")}
        with pytest.raises(InputArrayError, match="shape"):
            session.predict(np.zeros((3, 5), "float32"))
        with pytest.raises(InputArrayError, match="cannot be cast safely"):
            session.predict(np.zeros((3, 4), "complex64"))
        assert session.resolved is not None and session.resolved.strategy == "current"
    assert session.client is None and worker is not None and not _alive(worker)
    assert isinstance(y, np.ndarray)
    assert _bitwise_equal(y, np.load(out))
    assert _bitwise_equal(y, np.load(data / "ref.npy"))
    np.save(tmp_path / "x7.npy", x[:7])
    seven = _json(run_cli("run", str(saved_tiny), "--input", str(tmp_path / "x7.npy"), "--output",
                          str(tmp_path / "y7.npy"), "--json", env=_env()))
    assert seven["rows"] == 7
    assert _bitwise_equal(again, np.load(tmp_path / "y7.npy"))
    for n, got in cast.items():
        assert _bitwise_equal(got, np.load(data / f"{n}.ref.npy")), n


MULTI_SCRIPT = """\
import sys
import keras
import numpy as np
keras.utils.set_random_seed(0)
a = keras.Input((3,), name="a")
b = keras.Input((2,), name="b")
h = keras.layers.Dense(5, activation="tanh", name="h")(keras.layers.Concatenate()([a, b]))
model = keras.Model([a, b], {"score": keras.layers.Dense(1, name="score")(h),
                             "probs": keras.layers.Dense(3, activation="softmax", name="probs")(h)})
model.save(sys.argv[1])
rng = np.random.default_rng(5)
x = {"a": rng.standard_normal((50, 3)).astype("float32"), "b": rng.standard_normal((50, 2)).astype("float32")}
np.savez(sys.argv[2], **x)
ref = keras.models.load_model(sys.argv[1]).predict(x, batch_size=32, verbose=0)
np.savez(sys.argv[3], **ref)
"""


@pytest.mark.slow
def test_multi_input_model_dict_in_dict_out(tmp_path: Path) -> None:
    model, x_path, ref_path = tmp_path / "multi.keras", tmp_path / "x.npz", tmp_path / "ref.npz"
    subprocess.run([sys.executable, "-c", MULTI_SCRIPT, str(model), str(x_path), str(ref_path)],
                   check=True, capture_output=True, timeout=300)
    saved = run_cli("save", str(model), "--json", env=_env())
    assert saved.returncode == 0, saved.stderr
    with np.load(x_path) as npz:
        x = {k: npz[k] for k in npz.files}
    with np.load(ref_path) as npz:
        ref = {k: npz[k] for k in npz.files}
    assert set(ref) == {"score", "probs"}

    with envlock.load(model) as session:
        y = session.predict(x)
        with pytest.raises(InputArrayError, match="no array for input"):
            session.predict({"a": x["a"]})
    assert set(y) == set(ref)
    for name in ref:
        assert _bitwise_equal(y[name], ref[name]), name

    out = tmp_path / "y.npz"
    doc = _json(run_cli("run", str(model), "--input", str(x_path), "--output", str(out), "--json",
                        env=_env()))
    assert {o["name"] for o in doc["outputs"]} == set(ref)
    with np.load(out, allow_pickle=False) as npz:
        for name in ref:
            assert _bitwise_equal(npz[name], ref[name]), name
    single = run_cli("run", str(model), "--input", str(x_path), "--output", str(tmp_path / "y.npy"),
                     env=_env())
    assert single.returncode == 2 and "write them to an .npz file" in _one_error(single.stderr)


# --- issue 10 sections 6 and 7: output keys, models that sample ----------------------------------


def test_outputs_sharing_a_name_get_unique_stable_keys() -> None:
    from envlock.worker.payload.model import unique_names

    assert unique_names(["o_net", "o_net", "o_net"]) == ["o_net", "o_net_1", "o_net_2"]
    # A name the model already uses is skipped, and the first of each name keeps it.
    assert unique_names(["a", "a", "a_1", "b"]) == ["a", "a_2", "a_1", "b"]
    assert unique_names(["x", "y"]) == ["x", "y"]


def test_run_says_which_outputs_a_sampling_model_does_not_reproduce() -> None:
    from envlock.commands.run import NOT_COMPARABLE, Validation, reproducibility_note, sampled_outputs

    outputs = [{"name": n} for n in ("z_mean", "z_log_var", "z")]
    m = {"probe": {"repeat_bitwise_equal": False, "varying_outputs": ["z"], "outputs": outputs}}
    assert sampled_outputs(m) == ("z",)
    note = reproducibility_note(m, Validation("identical", (), 0.0, sampled=("z",)))
    assert note is not None and "output(s) z are not reproducible bit for bit" in note
    assert "the other output(s) matched the probe (identical)" in note
    assert "nothing was validated" in str(reproducibility_note(m, None))
    assert "only run" in str(reproducibility_note(m, Validation(NOT_COMPARABLE, (), 0.0, sampled=("z",))))
    # A sidecar written before varying_outputs existed: every output is taken as sampled.
    old = {"probe": {"repeat_bitwise_equal": False, "outputs": outputs}}
    assert sampled_outputs(old) == ("z_mean", "z_log_var", "z")
    assert sampled_outputs({"probe": {"repeat_bitwise_equal": True, "outputs": outputs}}) == ()
    assert reproducibility_note({"probe": {"repeat_bitwise_equal": True}}, None) is None
