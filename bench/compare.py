"""envlock against MLflow's model environments, for one small TensorFlow model (issue 7).

One command, from a fresh clone (10-20 minutes on a 2-core machine):
    ./dev bench compare [--repeats N] [--cold-repeats N] [--slow-repeats N] [--managers uv,virtualenv]
                        [--only predict|rebuild] [--json PATH] [--png PATH] [--keep]

Measured in one run on this machine, for the same model file and the same 256-row input:

predict   end-to-end wall time of one command, as a user types it:
          - the floor: a plain script that loads the model with Keras and predicts, in the
            environment the model was trained in (no environment management at all); beside
            it the same script ending in os._exit, as envlock's worker ends (no teardown);
          - `envlock run MODEL --strategy venv`, warm (environment cached) and cold (empty
            ENVLOCK_HOME and an empty uv cache);
          - `mlflow models predict --env-manager uv` and `--env-manager virtualenv`, warm (uv cache
            filled by an earlier call) and cold (empty uv and pip caches).
rebuild   the full rebuild of the environment: `envlock env` against `uv venv` + `uv pip sync
          --require-hashes` and `python -m venv` + `pip install --require-hashes` of the same
          requirements.lock.txt, and `mlflow models prepare-env` with each env manager; with
          empty caches, and (envlock, uv, MLflow uv) again with the uv cache warm.
capture   what each tool wrote down: transitive pins, hashes, Python, CUDA/cuDNN, GPU,
          determinism settings, reference outputs.

Prints a table of ratios against the floor (and, for rebuilds, against `uv pip sync`), writes
it as JSON (bench/out/compare.json) and draws it (bench/out/compare.png). Never asserts: the
machine is noisy and shared. "Cold" empties only what is named in each row: the OS page cache
is not dropped and downloads come from the index as this machine reaches it.

`mlflow models predict --env-manager virtualenv` runs `pyenv install` into a per-call temporary
PYENV_ROOT, i.e. it builds CPython from source from www.python.org on every call; where that
cannot run (no route to python.org) the row says so instead of a time.

The bench's own tools (MLflow, matplotlib) go into bench/.venv-compare, created by this script
with uv from bench/requirements-compare.txt, never into envlock's .venv. The model is trained
and saved with envlock in a third venv holding only TensorFlow, Keras and envlock (a user's
training environment), so envlock's lock is what a user would get, not the dev tools.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
QUICKSTART = ROOT / "examples" / "quickstart"
COMPARE_VENV = BENCH / ".venv-compare"
REQUIREMENTS = BENCH / "requirements-compare.txt"
OUT = BENCH / "out"
TARGETS = {"warm_vs_floor": 1.10, "cold_build_vs_uv": 1.15}

# The floor: what a user writes without any environment tool, in the training environment.
PLAIN = """\
import sys

import keras
import numpy as np

import layers  # noqa: F401  (registers the custom layer, as the user's own code would)

model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(x, batch_size=32, verbose=0))
"""
# The same, ending the way envlock's worker ends: flush, then os._exit, skipping the interpreter's
# teardown (with TensorFlow loaded, most of a second here). Shown beside the floor, so that the
# part of envlock's lead that comes from skipping it is visible.
PLAIN_NO_TEARDOWN = PLAIN + """
import os

sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


# -- small helpers --------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def base_env(**extra: str | os.PathLike[str] | None) -> dict[str, str]:
    """The environment of every measured command: the user's, byte code cached (a user's
    default), TensorFlow's start-up chatter off; ``None`` removes a variable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = os.fspath(v)
    return env


CPU: list[float] = [0.0]  # CPU seconds (user + system) of the last command and every process it waited for


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Failed(Exception):
    """A measured command that failed; ``reason`` is the gist of its output."""

    def __init__(self, reason: str, seconds: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seconds = seconds


def gist(output: str) -> str:
    keep = [ln.strip() for ln in output.splitlines()
            if re.search(r"^(Command:|error:|curl:|ERROR:)|Exception:", ln.strip())]
    return " | ".join(dict.fromkeys(keep))[:400] or output.strip().splitlines()[-1][:400]


def run(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str], cwd: Path, what: str,
        timeout: float = 1800, fatal: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds and the result; CPU[0] gets the command's CPU seconds (its process tree's,
    as far as each parent waited for its children), which a busy neighbour disturbs less."""
    args = [os.fspath(a) for a in argv]
    cpu = _children_cpu()
    t = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t
    CPU[0] = _children_cpu() - cpu
    if done.returncode != 0 and not fatal:
        raise Failed(gist(done.stderr + "\n" + done.stdout), seconds)
    if done.returncode != 0:
        tail = "\n".join((done.stderr + "\n" + done.stdout).strip().splitlines()[-25:])
        raise SystemExit(f"compare: {what} failed (exit {done.returncode}): {' '.join(args)}\n{tail}")
    return seconds, done


def uv_exe() -> Path:
    """The uv that envlock itself uses (next to this interpreter, as ./dev installs it)."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.is_file() else shutil.which("uv")
    if not found:
        raise SystemExit("compare: uv not found (./dev installs it into .venv)")
    return Path(found)


def envlock_exe() -> list[str]:
    script = Path(sys.executable).parent / "envlock"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "envlock"]


def base_python() -> Path:
    """The interpreter behind this venv: every venv of the bench is made from it."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return Path(exe)


def framework_pins() -> list[str]:
    pins = []
    for name in ("tensorflow-cpu", "tensorflow", "keras"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{name}=={metadata.version(name)}")
    if not any(p.startswith("keras==") for p in pins) or len(pins) < 2:
        raise SystemExit("compare: run it with envlock's dev venv (./dev bench compare): TensorFlow "
                         "and Keras are needed to know which versions to train with")
    return pins


def site_packages_count(venv: Path) -> int:
    """Distributions installed in a venv (its .dist-info folders)."""
    return len(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "*.dist-info")))


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# -- set-up: the bench's own venv, the training venv, the model, the MLflow model ------------------


def ensure_compare_venv(uv: Path, pins: list[str]) -> Path:
    """bench/.venv-compare with MLflow, matplotlib and the framework versions of .venv."""
    py = COMPARE_VENV / "bin" / "python"
    text = REQUIREMENTS.read_text() + "\n".join(pins) + str(base_python())
    want = hashlib.sha256(text.encode()).hexdigest()
    stamp = COMPARE_VENV / ".compare-stamp"
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return py
    say(f"compare: installing MLflow and matplotlib into {COMPARE_VENV.relative_to(ROOT)} (once)...")
    env = base_env(VIRTUAL_ENV=None)
    if not py.is_file():
        run([uv, "venv", "-q", "--python", base_python(), COMPARE_VENV], env=env, cwd=ROOT, what="uv venv")
    run([uv, "pip", "install", "-q", "--python", py, "-r", REQUIREMENTS, *pins], env=env, cwd=ROOT,
        what="installing bench/requirements-compare.txt")
    stamp.write_text(want + "\n")
    return py


def make_training_venv(uv: Path, work: Path, pins: list[str]) -> Path:
    """A user's training environment: the framework and envlock, nothing else."""
    venv = work / "train-venv"
    env = base_env(VIRTUAL_ENV=None)
    run([uv, "venv", "-q", "--python", base_python(), venv], env=env, cwd=work, what="uv venv (training)")
    py = venv / "bin" / "python"
    run([uv, "pip", "install", "-q", "--python", py, *pins, "-e", ROOT], env=env, cwd=work,
        what="installing the training environment")
    return py


def train_and_save(train_py: Path, work: Path, config: Path) -> None:
    for f in ("layers.py", "train.py"):
        shutil.copy(QUICKSTART / f, work / f)
    run([train_py, "train.py", "model.keras"], env=base_env(ENVLOCK_HOME=work / "home-save",
                                                            ENVLOCK_CONFIG_DIR=config),
        cwd=work, what="training and saving the model with envlock")


def log_mlflow_child(work: Path) -> int:
    """Runs in bench/.venv-compare: log the same model with MLflow's TensorFlow flavor."""
    os.chdir(work)
    sys.path.insert(0, str(work))
    import keras
    import mlflow
    import mlflow.tensorflow
    import numpy as np
    from layers import Scale

    model = keras.saving.load_model(work / "model.keras")
    x = np.load(work / "model.keras.input.npy")
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("envlock-compare")
    t = time.perf_counter()
    with mlflow.start_run():
        # What the MLflow docs show: the custom layer's module as code, the class as a custom
        # object, an input example (from which MLflow infers the signature and requirements).
        info = mlflow.tensorflow.log_model(model, name="model", input_example=x[:5],
                                           code_paths=[str(work / "layers.py")],
                                           custom_objects={"Scale": Scale})
    seconds = time.perf_counter() - t
    local = mlflow.artifacts.download_artifacts(info.model_uri)
    print(json.dumps({"model_uri": info.model_uri, "path": local, "log_seconds": seconds,
                      "mlflow": mlflow.__version__}))
    return 0


def plot_child(json_path: Path, png: Path) -> int:
    """Runs in bench/.venv-compare (matplotlib): the table as a chart, for the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    doc = json.loads(json_path.read_text())
    sections = [("predict", "Predict 256 rows, end to end (x the in-process floor)", "x_floor"),
                ("rebuild", "Rebuild the environment (x `uv venv` + `uv pip sync`, same cache state)",
                 "x_uv")]
    table = doc["table"]
    sections = [s for s in sections if table.get(s[0])]
    heights = [max(2.0, 0.42 * len(table[key]) + 1.0) for key, _, _ in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (key, title, col) in zip(axes[:, 0], sections):
        rows = [r for r in table[key] if r.get(col) == r.get(col) or r.get("failed")][::-1]
        ok = [r[col] for r in rows if not r.get("failed")]
        colors = {"envlock": "#2b8a3e", "baseline": "#868e96", "mlflow": "#1c7ed6"}
        bars = ax.barh([r["label"] for r in rows], [0 if r.get("failed") else r[col] for r in rows],
                       color=[colors[r["tool"]] for r in rows])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.axvline(1.0, color="black", linewidth=0.8)
        for bar, r in zip(bars, rows):
            y = bar.get_y() + bar.get_height() / 2
            if r.get("failed"):
                ax.text(min(ok) / 1.4, y, "  could not run here (see the notes)", va="center", fontsize=8,
                        color="#c92a2a")
            else:
                ax.text(r[col] * 1.04, y, f"{r[col]:.2f}x  ({r['seconds']:.1f} s)", va="center", fontsize=8)
        ax.set_xlim(min(ok) / 1.4, max(ok) * 6)
        ax.set_title(title, fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
    m = doc["machine"]
    fig.suptitle(f"envlock vs MLflow {doc['versions']['mlflow']} model environments — {m['cpus']} CPUs, "
                 f"Python {m['python']}, TensorFlow {doc['versions']['tensorflow']}; green envlock, "
                 "blue MLflow, grey baselines", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    return 0


# -- the measurements -----------------------------------------------------------------------------


def record(r: dict[str, Any], key: str, seconds: float, *, cpu: float | None = None,
           phases: dict[str, float] | None = None) -> None:
    """One measurement: wall seconds, CPU seconds (of the last command, unless given), phases."""
    entry = r.setdefault(key, {"times": [], "cpu": []})
    entry["times"].append(seconds)
    entry["cpu"].append(CPU[0] if cpu is None else cpu)
    if phases is not None:
        entry.setdefault("phases", []).append(phases)


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.uv = uv_exe()
        self.config = work / "config"  # the trust list: the sidecar saved here is trusted in every home
        self.model = work / "model.keras"
        self.input = work / "model.keras.input.npy"
        self.input_json = work / "input.json"
        self._n = 0
        self.floor_out = work / "floor.npy"
        self.outputs_equal: dict[str, Any] = {}
        self.mlflow_envs: dict[str, Path] = {}
        self.managers: list[str] = []
        self.lock = self.model.with_name(self.model.name + ".envlock") / "requirements.lock.txt"
        self.mlflow_model = ""

    def fresh(self, name: str) -> Path:
        """A new, empty folder (a cold cache or an empty home)."""
        while True:
            self._n += 1
            path = self.work / f"{name}-{self._n}"
            if not path.exists():
                path.mkdir(parents=True)
                return path

    def mlflow_env(self, *, env_root: Path, uv_cache: Path | None = None,
                   pip_cache: Path | None = None) -> dict[str, str]:
        path = os.pathsep.join([str(COMPARE_VENV / "bin"), str(self.uv.parent), os.environ.get("PATH", "")])
        return base_env(PATH=path, MLFLOW_ENV_ROOT=env_root, UV_CACHE_DIR=uv_cache, PIP_CACHE_DIR=pip_cache,
                        VIRTUAL_ENV=None, MLFLOW_TRACKING_URI=None)

    def envlock_env(self, home: Path, uv_cache: Path | None) -> dict[str, str]:
        return base_env(ENVLOCK_HOME=home, ENVLOCK_CONFIG_DIR=self.config, UV_CACHE_DIR=uv_cache)

    def same_as_floor(self, key: str, got: Any) -> None:
        import numpy as np

        ref = np.load(self.floor_out)
        got = np.asarray(got, dtype=ref.dtype)
        self.outputs_equal[key] = {
            "bitwise_equal": bool(got.shape == ref.shape and np.array_equal(got, ref)),
            "max_abs_diff": float(np.max(np.abs(got - ref))) if got.shape == ref.shape else None,
        }

    # -- predict ------------------------------------------------------------------------------
    def floor(self, train_py: Path, script: str = "plain.py") -> float:
        s, _ = run([train_py, self.work / script, self.model, self.input, self.floor_out],
                   env=base_env(), cwd=self.work, what=f"the in-process script {script}")
        return s

    def envlock_run(self, env: dict[str, str], out: Path) -> tuple[float, dict[str, Any]]:
        s, done = run([*envlock_exe(), "run", self.model, "--input", self.input, "--output", out,
                       "--strategy", "venv", "--json"], env=env, cwd=self.work, what="envlock run")
        return s, json.loads(done.stdout)

    def mlflow_predict(self, manager: str, env: dict[str, str], out: Path) -> float:
        s, _ = run([COMPARE_VENV / "bin" / "mlflow", "models", "predict", "-m", self.mlflow_model, "-i",
                    self.input_json, "-o", out, "-t", "json", "--env-manager", manager], env=env,
                   cwd=self.work, what=f"mlflow models predict --env-manager {manager}", fatal=False)
        return s

    def bench_predict(self, train_py: Path) -> dict[str, Any]:
        a = self.args
        r: dict[str, Any] = {}
        say("predict: the floor and envlock...")
        self.floor(train_py)  # warm-up, untimed (page cache)
        # envlock cold: empty ENVLOCK_HOME, empty uv cache. The last cold run's home is then
        # the warm home (its environment is cached).
        home = None
        for _ in range(a.cold_repeats):
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)
            home, cache = self.fresh("home-cold"), self.fresh("uv-cache-cold")
            s, doc = self.envlock_run(self.envlock_env(home, cache), self.work / "envlock-cold.npy")
            if not doc["built"]:
                raise SystemExit("compare: envlock found an environment in an empty ENVLOCK_HOME")
            record(r, "envlock_cold", s, phases=doc["seconds"])
            shutil.rmtree(cache, ignore_errors=True)
        assert home is not None
        cached = self.envlock_env(home, None)  # uv is not called when the environment is cached
        # One untimed run: a venv built by uv has no byte code yet; the first import writes it.
        self.envlock_run(cached, self.work / "envlock-warm.npy")
        sides = ["floor", "floor_no_teardown", "envlock"]
        for i in range(a.repeats):
            for side in sides[i % 3:] + sides[:i % 3]:  # each side first, middle and last in turn
                if side == "floor":
                    record(r, "floor", self.floor(train_py))
                elif side == "floor_no_teardown":
                    record(r, side, self.floor(train_py, "plain_no_teardown.py"))
                else:
                    s, doc = self.envlock_run(cached, self.work / "envlock-warm.npy")
                    if doc["built"]:
                        raise SystemExit("compare: envlock rebuilt an environment it had cached")
                    record(r, "envlock_warm", s, phases=doc["seconds"])
        shutil.rmtree(home, ignore_errors=True)
        import numpy as np

        self.same_as_floor("envlock run", np.load(self.work / "envlock-warm.npy"))

        for manager in self.managers:
            say(f"predict: mlflow models predict --env-manager {manager}...")
            out = self.work / f"mlflow-{manager}.json"
            warm_env: dict[str, str] | None = None
            try:
                for _ in range(a.cold_repeats if manager == "uv" else a.slow_repeats):
                    if warm_env is not None:
                        shutil.rmtree(warm_env["UV_CACHE_DIR"], ignore_errors=True)
                        shutil.rmtree(warm_env["PIP_CACHE_DIR"], ignore_errors=True)
                    warm_env = self.mlflow_env(env_root=self.fresh("mlflow-root"),
                                               uv_cache=self.fresh("uv-cache"),
                                               pip_cache=self.fresh("pip-cache"))
                    record(r, f"mlflow_{manager}_cold", self.mlflow_predict(manager, warm_env, out))
                assert warm_env is not None
                for _ in range(a.repeats if manager == "uv" else a.slow_repeats):  # caches the last filled
                    record(r, f"mlflow_{manager}_warm", self.mlflow_predict(manager, warm_env, out))
                self.same_as_floor(f"mlflow {manager}", json.loads(out.read_text())["predictions"])
            except Failed as exc:
                say(f"  failed after {exc.seconds:.1f} s: {exc.reason}")
                for state in ("cold", "warm"):
                    r.setdefault(f"mlflow_{manager}_{state}", {"times": [], "cpu": []})["failed"] = exc.reason
            if warm_env is not None:
                shutil.rmtree(warm_env["UV_CACHE_DIR"], ignore_errors=True)
                shutil.rmtree(warm_env["PIP_CACHE_DIR"], ignore_errors=True)
        return r

    # -- rebuild ------------------------------------------------------------------------------
    def envlock_build(self, uv_cache: Path) -> tuple[float, Path]:
        home = self.fresh("home-build")
        s, done = run([*envlock_exe(), "env", self.model, "--strategy", "venv", "--json"],
                      env=self.envlock_env(home, uv_cache), cwd=self.work, what="envlock env")
        doc = json.loads(done.stdout)
        if not doc["built"]:
            raise SystemExit("compare: envlock env found an environment in an empty ENVLOCK_HOME")
        return s, Path(doc["path"])

    def uv_build(self, uv_cache: Path) -> tuple[float, Path]:
        venv = self.fresh("uv-venv")
        shutil.rmtree(venv)
        env = base_env(UV_CACHE_DIR=uv_cache, VIRTUAL_ENV=None)
        a, _ = run([self.uv, "venv", "-q", "--python", base_python(), venv], env=env, cwd=self.work,
                   what="uv venv")
        cpu = CPU[0]
        b, _ = run([self.uv, "pip", "sync", "-q", "--require-hashes", "--python", venv / "bin" / "python",
                    self.lock], env=env, cwd=self.work, what="uv pip sync")
        CPU[0] += cpu
        return a + b, venv

    def pip_build(self, pip_cache: Path) -> tuple[float, Path]:
        venv = self.fresh("pip-venv")
        shutil.rmtree(venv)
        env = base_env(PIP_CACHE_DIR=pip_cache, VIRTUAL_ENV=None)
        a, _ = run([base_python(), "-m", "venv", venv], env=env, cwd=self.work, what="python -m venv")
        cpu = CPU[0]
        b, _ = run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
                    "-r", self.lock], env=env, cwd=self.work, what="pip install")
        CPU[0] += cpu
        return a + b, venv

    def mlflow_build(self, manager: str, uv_cache: Path, pip_cache: Path) -> tuple[float, Path]:
        root = self.fresh("mlflow-root")
        s, _ = run([COMPARE_VENV / "bin" / "mlflow", "models", "prepare-env", "-m", self.mlflow_model,
                    "--env-manager", manager],
                   env=self.mlflow_env(env_root=root, uv_cache=uv_cache, pip_cache=pip_cache), cwd=self.work,
                   what=f"mlflow models prepare-env --env-manager {manager}", fatal=False)
        envs = [p for p in root.iterdir() if p.is_dir()]
        return s, envs[0] if envs else root

    def bench_rebuild(self) -> dict[str, Any]:
        a = self.args
        r: dict[str, Any] = {}
        packages: dict[str, int] = {}

        def measure(key: str, fn: Any, cache: Path, *, keep: bool = False) -> None:
            s, venv = fn(cache)
            record(r, key, s)
            packages[key.rsplit("_", 1)[0]] = site_packages_count(venv)
            if not keep:
                shutil.rmtree(venv, ignore_errors=True)

        def mlflow_uv(cache: Path) -> tuple[float, Path]:
            return self.mlflow_build("uv", cache, cache / "pip")

        say("rebuild: empty caches (envlock and uv alternating, then pip and MLflow)...")
        for i in range(a.cold_repeats):
            cold_sides: list[tuple[str, Any]] = [("envlock_cold", self.envlock_build),
                                                 ("uv_cold", self.uv_build)]
            for key, fn in cold_sides[:: 1 if i % 2 == 0 else -1]:
                cache = self.fresh("cache-cold")
                measure(key, fn, cache)
                shutil.rmtree(cache, ignore_errors=True)
        if not a.skip_pip:
            say("rebuild: python -m venv + pip install (slow)...")
            for _ in range(a.slow_repeats):
                cache = self.fresh("pip-cache-cold")
                measure("pip_cold", self.pip_build, cache)
                shutil.rmtree(cache, ignore_errors=True)
        for manager in self.managers:
            say(f"rebuild: mlflow models prepare-env --env-manager {manager}...")
            for _ in range(a.cold_repeats if manager == "uv" else a.slow_repeats):
                cache = self.fresh("cache-cold")
                try:
                    s, venv = self.mlflow_build(manager, cache, cache / "pip")
                except Failed as exc:
                    say(f"  failed after {exc.seconds:.1f} s: {exc.reason}")
                    r.setdefault(f"mlflow_{manager}_cold", {"times": [], "cpu": []})["failed"] = exc.reason
                    break
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                record(r, f"mlflow_{manager}_cold", s)
                packages[f"mlflow_{manager}"] = site_packages_count(venv)
                self.mlflow_envs[manager] = venv  # kept: capture() lists what MLflow installed

        say("rebuild: uv cache warm (envlock, uv, MLflow uv alternating)...")
        warm_cache = self.fresh("cache-warm")
        shutil.rmtree(self.envlock_build(warm_cache)[1], ignore_errors=True)  # fills the cache, untimed
        sides: list[tuple[str, Any]] = [("envlock_warm", self.envlock_build), ("uv_warm", self.uv_build)]
        if "uv" in self.managers:
            shutil.rmtree(mlflow_uv(warm_cache)[1], ignore_errors=True)  # MLflow's packages, untimed
            sides.append(("mlflow_uv_warm", mlflow_uv))
        for i in range(a.repeats):
            for key, fn in sides[:: 1 if i % 2 == 0 else -1]:
                measure(key, fn, warm_cache)
        shutil.rmtree(warm_cache, ignore_errors=True)
        r["packages"] = packages
        return r

    # -- what each captured --------------------------------------------------------------------
    def capture(self) -> dict[str, dict[str, str]]:
        sc = self.model.with_name(self.model.name + ".envlock")
        man = json.loads((sc / "envlock.json").read_text())
        lock = (sc / "requirements.lock.txt").read_text()
        pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)
        hashed = sum(1 for block in re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", lock) if "--hash=sha256:" in block)
        cuda = man.get("cuda") or {}
        gpu = man.get("gpu") or {}
        gpus = gpu.get("gpus") or []
        det = man.get("determinism") or {}
        probe = man.get("probe") or {}
        outs = ", ".join(f"{o['name']}{tuple(o['shape'])}" for o in probe.get("outputs", []))
        envlock_cap = {
            "transitive pins": f"yes: {len(pins)} distributions, every one ==pinned",
            "hashes": f"yes: sha256 for {hashed} of {len(pins)} (every file of each version)",
            "Python version": f"{man['python']['implementation']} {man['python']['version']} "
                              f"({man['python']['abi']})",
            "CUDA/cuDNN": (f"yes: CUDA build {cuda.get('is_cuda_build')}, cuda {cuda.get('cuda_version')}, "
                           f"cudnn {cuda.get('cudnn_version')}, "
                           f"{len(cuda.get('nvidia_wheels') or {})} nvidia-* wheels"),
            "GPU": (f"yes: {len(gpus)} ({', '.join(str(g.get('name')) for g in gpus)})" if gpus
                    else "yes: none on this machine (looked with NVML and nvidia-smi)"),
            "determinism settings": (f"yes: oneDNN {det.get('onednn', {}).get('effective')}, op determinism "
                                     f"{det.get('op_determinism')}, TF32 {det.get('tf32')}, threads, jit, "
                                     f"dtype policy, {len(det.get('env') or {})} env variables"),
            "reference outputs": f"yes: probe.npz, {outs} (checked before every run)",
        }
        m = Path(self.mlflow_model)
        req = (m / "requirements.txt").read_text()
        mpins = [ln.strip() for ln in req.splitlines() if "==" in ln]
        pyenv = (m / "python_env.yaml").read_text()
        pyver = re.search(r"^python:\s*(\S+)", pyenv, re.M)
        texts = "\n".join(p.read_text(errors="replace") for p in m.rglob("*")
                          if p.is_file() and p.suffix in (".txt", ".yaml", ".json", "")
                          and p.stat().st_size < 1e6)
        installed = self.mlflow_envs.get("uv") or self.mlflow_envs.get("virtualenv")
        n_inst = site_packages_count(installed) if installed else None
        names = [p.split("==")[0].lower() for p in mpins]
        unpinned = "" if "keras" in names else "; keras unpinned"
        if "keras" not in names and installed:
            got = glob.glob(str(installed / "lib" / "python*" / "site-packages" / "keras-*.dist-info"))
            if got:
                unpinned += f" (resolved to {Path(got[0]).name[len('keras-'):-len('.dist-info')]} here)"
        both = ("; lists tensorflow as well as tensorflow-cpu, so both are installed"
                if {"tensorflow", "tensorflow-cpu"} <= set(names) else "")

        def found(*words: str) -> bool:
            return any(re.search(w, texts, re.I) for w in words)

        mlflow_cap = {
            "transitive pins": (f"no: {len(mpins)} direct pins ({', '.join(p.split('==')[0] for p in mpins)})"
                                + (f"; the other {n_inst - len(mpins)} of the {n_inst} installed are "
                                   "resolved at install time" if n_inst else "") + unpinned + both),
            "hashes": "yes" if "--hash" in req else "no",
            "Python version": f"{pyver.group(1) if pyver else '?'} (python_env.yaml; version only)",
            "CUDA/cuDNN": "yes" if found(r"cudnn", r"cuda_version") else "no",
            "GPU": "yes" if found(r"\bgpu_name\b", r"compute_capability", r"nvidia-smi") else "no",
            "determinism settings": "yes" if found(r"ONEDNN", r"op_determinism", r"TF_DETERMINISTIC",
                                                   r"PYTHONHASHSEED") else "no",
            "reference outputs": ("no: input_example.json holds 5 input rows and the signature output "
                                  "dtype/shape, no outputs" if not found(r"output_example", r"predictions")
                                  else "yes"),
        }
        return {"envlock": envlock_cap, "mlflow": mlflow_cap}


# -- report ---------------------------------------------------------------------------------------


def rows_from(res: dict[str, Any], managers: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    p, b = res.get("predict") or {}, res.get("rebuild") or {}
    predict: list[dict[str, Any]] = []
    floor = median(p["floor"]["times"]) if p else float("nan")

    def add(sink: list[dict[str, Any]], key: str, src: dict[str, Any], label: str, tool: str) -> None:
        if key in src and src[key].get("failed"):
            sink.append({"key": key, "label": label, "tool": tool, "seconds": float("nan"), "n": 0,
                         "times": [], "cpu_seconds": float("nan"), "x_floor": float("nan"),
                         "failed": src[key]["failed"]})
        elif key in src and src[key]["times"]:
            t = src[key]["times"]
            sink.append({"key": key, "label": label, "tool": tool, "seconds": median(t), "n": len(t),
                         "times": t, "cpu_seconds": median(src[key].get("cpu") or []),
                         "x_floor": median(t) / floor})

    if p:
        add(predict, "floor", p, "in-process script, training venv (floor)", "baseline")
        add(predict, "floor_no_teardown", p, "the same script ending in os._exit (no teardown)", "baseline")
        add(predict, "envlock_warm", p, "envlock run, warm (env cached)", "envlock")
        add(predict, "envlock_cold", p, "envlock run, cold (empty ENVLOCK_HOME + uv cache)", "envlock")
        for m in managers:
            add(predict, f"mlflow_{m}_warm", p, f"mlflow models predict, {m}, warm", "mlflow")
            add(predict, f"mlflow_{m}_cold", p, f"mlflow models predict, {m}, cold", "mlflow")
    rebuild: list[dict[str, Any]] = []
    if b:
        add(rebuild, "uv_cold", b, "uv venv + uv pip sync, empty uv cache", "baseline")
        add(rebuild, "envlock_cold", b, "envlock env, empty uv cache", "envlock")
        add(rebuild, "pip_cold", b, "python -m venv + pip install, empty pip cache", "baseline")
        for m in managers:
            add(rebuild, f"mlflow_{m}_cold", b, f"mlflow models prepare-env, {m}, empty caches", "mlflow")
        add(rebuild, "uv_warm", b, "uv venv + uv pip sync, warm uv cache", "baseline")
        add(rebuild, "envlock_warm", b, "envlock env, warm uv cache", "envlock")
        add(rebuild, "mlflow_uv_warm", b, "mlflow models prepare-env, uv, warm uv cache", "mlflow")
        uv = {"cold": median(b["uv_cold"]["times"]), "warm": median(b["uv_warm"]["times"]) if "uv_warm" in b
              else float("nan")}
        for r in rebuild:
            r["x_uv"] = r["seconds"] / uv["warm" if r["key"].endswith("_warm") else "cold"]
    return predict, rebuild


def report(res: dict[str, Any], managers: list[str]) -> dict[str, Any]:
    predict, rebuild = rows_from(res, managers)
    res["table"] = {"predict": predict, "rebuild": rebuild}
    w = 58

    def line(r: dict[str, Any], cols: list[str]) -> str:
        if r.get("failed"):
            return f"{r['label']:{w}} {'could not run here (see below)':>28}"
        ratios = " ".join(f"{r[c]:7.2f}x" for c in cols)
        return f"{r['label']:{w}} {r['seconds']:8.2f} {ratios} {r['cpu_seconds']:7.1f} {r['n']:3d}"

    if predict:
        say(f"\n{'predict 256 rows, end to end':{w}} {'seconds':>8} {'x floor':>8} {'CPU s':>7}   n")
        for r in predict:
            say(line(r, ["x_floor"]))
    if rebuild:
        say(f"\n{'rebuild the environment':{w}} {'seconds':>8} {'x uv':>8} {'x floor':>8} {'CPU s':>7}   n")
        for r in rebuild:
            say(line(r, ["x_uv", "x_floor"]))
        say("(x uv: against `uv venv` + `uv pip sync --require-hashes` of the same lock with the same "
            "cache state)")
    for r in predict + rebuild:
        if r.get("failed") and not r["key"].endswith("_warm"):
            say(f"could not run: {r['label']}: {r['failed']}")

    verdicts = []
    by = {r["key"]: r for r in predict}
    if "envlock_warm" in by:
        x = by["envlock_warm"]["x_floor"]
        verdicts.append(("warm envlock run <= 1.10x the floor", f"{x:.2f}x", x <= TARGETS["warm_vs_floor"]))
        if "floor_no_teardown" in by:
            x = by["envlock_warm"]["seconds"] / by["floor_no_teardown"]["seconds"]
            verdicts.append(("  (same, against the floor without teardown)", f"{x:.2f}x",
                             x <= TARGETS["warm_vs_floor"]))
    rb = {r["key"]: r for r in rebuild}
    if "envlock_cold" in rb:
        x = rb["envlock_cold"]["x_uv"]
        verdicts.append(("cold rebuild <= 1.15x uv pip sync", f"{x:.2f}x", x <= TARGETS["cold_build_vs_uv"]))
    for state in ("warm", "cold"):
        mine = by.get(f"envlock_{state}")
        theirs = [r for r in predict if r["tool"] == "mlflow" and r["key"].endswith(state) and r["n"]]
        failed = [r["key"].split("_")[1] for r in predict if r["tool"] == "mlflow" and r.get("failed")
                  and r["key"].endswith(state)]
        if mine and theirs:
            best = min(theirs, key=lambda r: r["seconds"])
            verdicts.append((f"envlock run faster than every MLflow mode, {state}"
                             + (f" ({'/'.join(failed)} could not run)" if failed else ""),
                             f"{mine['seconds']:.1f} s vs best {best['seconds']:.1f} s",
                             mine["seconds"] < best["seconds"]))
    mine_b = rb.get("envlock_cold")
    theirs_b = [r for r in rebuild if r["tool"] == "mlflow" and r["key"].endswith("cold") and r["n"]]
    if mine_b and theirs_b:
        best = min(theirs_b, key=lambda r: r["seconds"])
        verdicts.append(("envlock rebuild faster than every MLflow rebuild, cold",
                         f"{mine_b['seconds']:.1f} s vs best {best['seconds']:.1f} s",
                         mine_b["seconds"] < best["seconds"]))
    if verdicts:
        say("\ntargets (measured, not asserted):")
        for name, value, ok in verdicts:
            say(f"  {name:62} {value:>26}  {'met' if ok else 'NOT met'}")
    res["targets"] = [{"target": n, "value": v, "met": ok} for n, v, ok in verdicts]

    p = res.get("predict") or {}
    if p.get("envlock_warm"):
        ph = p["envlock_warm"]["phases"]
        keys = sorted({k for d in ph for k in d})
        med = {k: median([d.get(k, 0.0) for d in ph]) for k in keys}
        say("\nwhere a warm `envlock run` goes (medians, s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
            + "; outside those (host start-up, sidecar check, worker exit) "
            + f"{median([t - sum(d.values()) for t, d in zip(p['envlock_warm']['times'], ph)]):.2f}")
        for key in ("floor", "floor_no_teardown", "envlock_warm"):
            if key in p:
                say(f"  {key} runs (s): " + " ".join(f"{t:.2f}" for t in p[key]["times"])
                    + "; CPU s: " + " ".join(f"{t:.2f}" for t in p[key]["cpu"]))
    b = res.get("rebuild") or {}
    for key in ("envlock_cold", "uv_cold"):
        if b.get(key, {}).get("times"):
            say(f"  rebuild {key} runs (s): " + " ".join(f"{t:.2f}" for t in b[key]["times"]))
    if p.get("envlock_cold"):
        ph = p["envlock_cold"]["phases"][0]
        say("cold `envlock run` phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ph.items())))
    if res.get("outputs_equal"):
        def verdict(v: dict[str, Any]) -> str:
            return "bitwise equal" if v["bitwise_equal"] else f"max abs diff {v['max_abs_diff']}"

        say("outputs against the floor's: " + "; ".join(f"{k} {verdict(v)}"
                                                          for k, v in res["outputs_equal"].items()))
    pk = (res.get("rebuild") or {}).get("packages")
    if pk:
        say("distributions installed: " + ", ".join(f"{k} {v}" for k, v in pk.items()))

    cap = res.get("capture")
    if cap:
        say(f"\n{'captured':22} {'envlock':62} MLflow")
        for item in cap["envlock"]:
            say(f"{item:22} {cap['envlock'][item]:62} {cap['mlflow'][item]}")

    say("\ncaches: 'cold' = ENVLOCK_HOME / MLFLOW_ENV_ROOT empty and UV_CACHE_DIR / PIP_CACHE_DIR pointed at "
        "new empty folders for that measurement only (the user's own caches are never touched); 'warm' "
        "envlock = environment cached in ENVLOCK_HOME (uv not called); 'warm' MLflow = the uv cache "
        "filled by the cold call. Not cold anywhere: the OS page cache, the base interpreter (pyenv), "
        "the package index as this machine reaches it.")
    say(f"MLflow {res['versions']['mlflow']}: `mlflow models predict` builds a new environment in a "
        "per-call temporary env root every time (mlflow/models/python_api.py passes "
        "create_env_root_dir=True), so no MLflow predict is warm beyond its package cache; with "
        "--env-manager virtualenv it also points PIP_CACHE_DIR and PYENV_ROOT into that temporary "
        "root, so pip's cache is cold and `pyenv install` builds CPython from source on every call. "
        "`mlflow models prepare-env` (the rebuild rows) uses MLFLOW_ENV_ROOT, the caches given and "
        "the installed pyenv Pythons. Its virtualenv manager is pyenv + `python -m venv` + pip.")
    return res


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each warm measurement (medians)")
    ap.add_argument("--cold-repeats", type=int, default=3,
                    help="repeats of each cold envlock / uv / MLflow-uv measurement")
    ap.add_argument("--slow-repeats", type=int, default=1, help="repeats of pip and MLflow-virtualenv "
                    "measurements (minutes each)")
    ap.add_argument("--only", choices=["predict", "rebuild"], action="append", help="run only these parts")
    ap.add_argument("--managers", default="uv,virtualenv",
                    help="MLflow env managers to measure, comma-separated (default: uv,virtualenv)")
    ap.add_argument("--skip-pip", action="store_true", help="leave out the plain pip rebuild")
    ap.add_argument("--json", type=Path, default=OUT / "compare.json")
    ap.add_argument("--png", type=Path, default=OUT / "compare.png")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--reuse-work", type=Path, help=argparse.SUPPRESS)  # a --keep folder (development)
    ap.add_argument("--log-mlflow", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--plot", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.log_mlflow:
        return log_mlflow_child(args.log_mlflow)
    if args.plot:
        return plot_child(*args.plot)
    only = set(args.only or ("predict", "rebuild"))

    uv = uv_exe()
    pins = framework_pins()
    compare_py = ensure_compare_venv(uv, pins)
    work = args.reuse_work or Path(tempfile.mkdtemp(prefix="envlock-bench-compare-"))
    managers = [m for m in ("uv", "virtualenv") if m in args.managers.split(",")]
    if "virtualenv" in managers and not shutil.which("pyenv"):
        say("compare: pyenv not on PATH: MLflow's virtualenv manager needs it; leaving it out")
        managers.remove("virtualenv")
    res: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
        "versions": {"tensorflow": next(p.split("==")[1] for p in pins if p.startswith("tensorflow")),
                     "keras": next(p.split("==")[1] for p in pins if p.startswith("keras==")),
                     "uv": run([uv, "--version"], env=base_env(), cwd=ROOT,
                               what="uv --version")[1].stdout.split()[1]},
        "managers": managers,
    }
    try:
        bench = Bench(work, args)
        train_py = work / "train-venv" / "bin" / "python"
        if args.reuse_work:
            logged = json.loads((work / "logged.json").read_text())
        else:
            bench.config.mkdir()
            say(f"compare: work folder {work}; a training venv (TensorFlow, Keras, envlock)...")
            t = time.perf_counter()
            make_training_venv(uv, work, pins)
            train_and_save(train_py, work, bench.config)
            (work / "plain.py").write_text(PLAIN)
            (work / "plain_no_teardown.py").write_text(PLAIN_NO_TEARDOWN)
            import numpy as np

            x = np.load(bench.input)
            bench.input_json.write_text(json.dumps({"inputs": x.tolist()}))
            say(f"compare: model trained and saved with envlock ({time.perf_counter() - t:.0f} s); logging "
                "it with mlflow.tensorflow.log_model...")
            _, done = run([compare_py, __file__, "--log-mlflow", work], env=base_env(), cwd=work,
                          what="logging the model with MLflow")
            logged = json.loads(done.stdout.strip().splitlines()[-1])
            (work / "logged.json").write_text(json.dumps(logged))
        bench.mlflow_model = logged["path"]
        res["versions"]["mlflow"] = logged["mlflow"]
        res["mlflow_log_seconds"] = logged["log_seconds"]
        bench.managers = managers
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if "predict" in only:
            res["predict"] = bench.bench_predict(train_py)
            args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")  # partial, in case
        if "rebuild" in only:
            res["rebuild"] = bench.bench_rebuild()
        res["outputs_equal"] = bench.outputs_equal
        res["capture"] = bench.capture()
        report(res, managers)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        run([compare_py, __file__, "--plot", args.json, args.png], env=base_env(), cwd=ROOT, what="the chart")
        say(f"\nwrote {args.json} and {args.png}")
    finally:
        if args.keep or args.reuse_work:
            say(f"compare: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
