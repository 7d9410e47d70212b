"""envlock check (issue 4): every cause of DESIGN section 4 built for real, then explained.

Each test makes a real model and a real change: a file rewritten, a module edited, a venv with
another numpy, another Keras or another Python, an environment variable, a startup hook. Nothing
is written into a sidecar by hand. `envlock check --json` must name the change as the cause
ranked first, or second where two causes are both true (a recorded H100 is also a recorded
CUDA driver). GPUs and other CPUs cannot exist here: those come from recorded real output
(tests/data/gpu, tests/data/cpuinfo), through a fake `nvidia-smi` on PATH and a recorded
/proc/cpuinfo.

Extra environments (another numpy, Keras 2, Python 3.12) are built once per session with uv
from the model's own lock where that is the point, sharing uv's cache.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from conftest import PROJECTS, CliResult, requires_tf
from test_gpu import make_fake_nvidia_smi

from envlock.facts.host import parse_cpuinfo

pytestmark = [requires_tf, pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux venv layout, /proc/cpuinfo, a POSIX fake nvidia-smi")]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
CHECK_KEYS = {"schema", "model", "status", "tolerance", "outputs", "findings", "notes", "strategy",
              "python", "error", "seconds"}
FINDING_KEYS = {"code", "summary", "evidence", "fix", "score", "rank", "details"}


# --- helpers ------------------------------------------------------------------------------------


def envlock_cli(*args: str, cwd: Path, python: Path | str = sys.executable,
                env: Mapping[str, str] | None = None, unset: Sequence[str] = (),
                timeout: float = 600) -> CliResult:
    """`python -m envlock ARGS` as a user runs it, with variables added (env) or removed (unset)."""
    full = dict(os.environ)
    full.pop("VIRTUAL_ENV", None)
    full.update(env or {})
    for k in unset:
        full.pop(k, None)
    p = subprocess.run([str(python), "-m", "envlock", *args], cwd=cwd, env=full, capture_output=True,
                       text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


def check_json(model: Path, *args: str, cwd: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """`envlock check MODEL --json ARGS`: the document, with the exit code checked against it."""
    res = envlock_cli("check", str(model), "--json", *args, cwd=cwd or model.parent, **kwargs)
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "envlock.check/1"
    # DESIGN: 0 identical/within tolerance, 1 mismatch, 4 the worker could not load or run it.
    want = {"identical": 0, "within_tolerance": 0, "mismatch": 1, "error": 4}[doc["status"]]
    assert res.returncode == want, (res.returncode, doc["status"], res.stderr[-2000:])
    return doc


def causes(doc: Mapping[str, Any]) -> list[str]:
    """The cause codes in rank order (and the ranks are 1..n, best first)."""
    findings = doc["findings"]
    assert [f["rank"] for f in findings] == list(range(1, len(findings) + 1))
    assert [f["score"] for f in findings] == sorted((f["score"] for f in findings), reverse=True)
    return [f["code"] for f in findings]


def finding(doc: Mapping[str, Any], code: str) -> dict[str, Any]:
    return next(f for f in doc["findings"] if f["code"] == code)


def save(model: Path, *args: str, python: Path | str = sys.executable,
         env: Mapping[str, str] | None = None) -> dict[str, Any]:
    res = envlock_cli("save", model.name, "--json", *args, cwd=model.parent, python=python, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def python_in(cwd: Path, code: str, *, python: Path | str = sys.executable,
              env: Mapping[str, str] | None = None) -> str:
    full = {**os.environ, **(env or {})}
    p = subprocess.run([str(python), "-c", code], cwd=cwd, env=full, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def uv(*args: str) -> None:
    if UV is None:
        pytest.skip("uv is not installed")
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    p = subprocess.run([UV, *args], env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"uv {' '.join(args)}\n{p.stderr[-3000:]}"


def copy_project(src_model: Path, dst: Path) -> Path:
    """The model, its sidecar (byte for byte, so still trusted) and the project's modules."""
    dst.mkdir(parents=True)
    for f in src_model.parent.glob("*.py"):
        shutil.copy(f, dst / f.name)
    shutil.copy(src_model, dst / src_model.name)
    shutil.copytree(src_model.parent / f"{src_model.name}.envlock", dst / f"{src_model.name}.envlock")
    return dst / src_model.name


def new_project(dst: Path, **modules: str) -> Path:
    """tests/projects/tiny's modules plus extra ones (name=source), for models made in a test."""
    dst.mkdir(parents=True)
    for f in (PROJECTS / "tiny").iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    for name, source in modules.items():
        (dst / f"{name}.py").write_text(source)
    return dst


def find_pyenv_python(minor: str) -> Path | None:
    found = sorted((PYENV_ROOT / "versions").glob(f"{minor}.*/bin/python{minor}"))
    return found[-1] if found else None


def swap_pin(lock_text: str, name: str, version: str) -> str:
    """The lock with one hashed `name==X` entry replaced by `name==version` (no hashes)."""
    entry = re.compile(rf"^{re.escape(name)}==\S+(?: \\\n\s+--hash=sha256:[0-9a-f]+)*\n", re.M)
    assert entry.search(lock_text), f"{name} is not in the lock"
    return entry.sub(f"{name}=={version}\n", lock_text, count=1)


@pytest.fixture
def project(saved_tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the saved tiny project (model.keras, sidecar, tinylayers.py)."""
    return copy_project(saved_tiny, tmp_path / "tiny")


# --- the very environment it was saved in ---------------------------------------------------------


def test_identical_where_it_was_saved_and_diff_shows_nothing(saved_tiny: Path) -> None:
    doc = check_json(saved_tiny, "--strategy", "current")
    assert set(doc) == CHECK_KEYS
    assert doc["status"] == "identical" and doc["error"] is None
    assert doc["findings"] == [] and doc["notes"] == []
    assert doc["strategy"] == "current"
    assert [o["status"] for o in doc["outputs"]] == ["identical"]
    assert doc["outputs"][0]["max_abs_diff"] == 0.0

    res = envlock_cli("diff", str(saved_tiny), "--json", cwd=saved_tiny.parent)
    assert res.returncode == 0, res.stderr
    diff = json.loads(res.stdout)
    assert diff["schema"] == "envlock.diff/1"
    assert diff["differences"] == 0 and diff["packages"] == [] and diff["findings"] == []
    assert diff["framework_error"] is None
    human = envlock_cli("diff", str(saved_tiny), cwd=saved_tiny.parent)
    assert human.returncode == 0 and "no differences" in human.stdout


@pytest.mark.slow
def test_identical_ten_times_in_a_row(saved_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No flaky finding: ten checks (each with its two workers) find nothing at all."""
    from envlock.commands.check import check

    monkeypatch.chdir(saved_tiny.parent)
    t0 = time.perf_counter()
    for i in range(10):
        result = check(saved_tiny, strategy="current")
        assert result.status == "identical", (i, result.to_json())
        assert result.ok and result.findings == () and result.notes == (), (i, result.to_json())
    print(f"ten checks: {time.perf_counter() - t0:.1f} s")


# --- the model and its code ----------------------------------------------------------------------


def test_model_file_changed(project: Path) -> None:
    """The same architecture re-saved with other weights over model.keras, the sidecar kept."""
    python_in(project.parent, "import keras, tinylayers\n"
              "m = keras.models.load_model('model.keras')\n"
              "k = m.get_layer('logits').kernel\n"
              "k.assign(k * 2.0)\n"
              "m.save('model.keras')\n")
    doc = check_json(project, "--strategy", "current")
    assert doc["status"] == "mismatch"
    assert causes(doc) == ["model_file_changed"]
    f = finding(doc, "model_file_changed")
    assert set(f) == FINDING_KEYS and set(f["evidence"]) == {"recorded", "current"}
    manifest = json.loads((project.parent / "model.keras.envlock" / "envlock.json").read_text())
    assert f["evidence"]["recorded"] == manifest["model"]["sha256"] != f["evidence"]["current"]


def test_weights_not_restored(tmp_path: Path) -> None:
    """ForgetfulDense skips restoring its weights; saved anyway with --allow-mismatch."""
    root = new_project(tmp_path / "forgetful")
    subprocess.run([sys.executable, "train.py", "forgetful.keras", "--forgetful"], cwd=root, check=True,
                   capture_output=True, timeout=600)
    saved = save(root / "forgetful.keras", "--allow-mismatch")
    assert saved["weights_restored"] is False
    doc = check_json(root / "forgetful.keras", "--strategy", "current")
    assert doc["status"] == "mismatch"
    assert causes(doc) == ["weights_not_restored"]
    details = finding(doc, "weights_not_restored")["details"]
    assert details["layers"] == ["forgetful"]
    # Every load draws the forgotten weights anew, so a fresh process differs too: explained by
    # this cause, not a second one (nondeterministic_model).
    assert details["fresh_process_differs"] is True
    assert "a fresh process gives other outputs" in finding(doc, "weights_not_restored")["summary"]


def test_custom_object_missing(project: Path, tmp_path: Path) -> None:
    """Checked from another folder, where tinylayers is not importable, by a user who has never
    trusted this sidecar's code/ (an empty trust list)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "fresh-home"
    doc = check_json(project, "--strategy", "current", cwd=elsewhere,
                     env={"ENVLOCK_HOME": str(home), "ENVLOCK_CONFIG_DIR": str(home / "config")})
    assert doc["status"] == "error" and "tinylayers" in doc["error"]
    assert causes(doc)[0] == "custom_object_missing"
    assert "--trust-code" in finding(doc, "custom_object_missing")["fix"]


def test_custom_object_changed(project: Path) -> None:
    """tinylayers.Scale, same registered name, now computes something else."""
    src = project.parent / "tinylayers.py"
    text = src.read_text()
    line = "return x * self.w * self.factor\n"
    assert line in text
    src.write_text(text.replace(line, "return x * self.w * self.factor + 1.0\n"))
    doc = check_json(project, "--strategy", "current")
    assert doc["status"] == "mismatch"
    assert causes(doc) == ["custom_object_changed"]
    f = finding(doc, "custom_object_changed")
    assert "tiny>Scale" in f["summary"] and f["details"]["file"] == str(src.resolve())


# --- packages -----------------------------------------------------------------------------------


def _other(current: str, candidates: Sequence[str]) -> str:
    return next(v for v in candidates if v != current)


@pytest.fixture(scope="session")
def numpy_venv(saved_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv synced from saved_tiny's own lock with two pins changed: numpy to another release
    TensorFlow accepts (it matters), iniconfig (it does not). envlock installed editable."""
    root = tmp_path_factory.mktemp("numpy-venv")
    lock = (saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt").read_text()
    changed = {"numpy": _other(metadata.version("numpy"), ("2.3.5", "2.2.6")),
               "iniconfig": _other(metadata.version("iniconfig"), ("2.1.0", "2.0.0"))}
    for name, version in changed.items():
        lock = swap_pin(lock, name, version)
    (root / "changed.lock.txt").write_text(lock)
    venv = root / "venv"
    uv("venv", "-q", "--python", sys.executable, str(venv))
    py = venv / "bin" / "python"
    uv("pip", "sync", "-q", "--python", str(py), str(root / "changed.lock.txt"))
    uv("pip", "install", "-q", "--no-deps", "--python", str(py), "-e", str(ROOT))
    return py, changed


def test_package_versions_differ(numpy_venv: tuple[Path, dict[str, str]], saved_tiny: Path) -> None:
    py, changed = numpy_venv
    doc = check_json(saved_tiny, "--strategy", "current", python=py)
    assert doc["python"] == str(py)
    assert causes(doc) == ["package_versions_differ"]
    f = finding(doc, "package_versions_differ")
    assert f["details"]["packages"] == ["numpy"]
    assert f["evidence"] == {"recorded": {"numpy": metadata.version("numpy")},
                             "current": {"numpy": changed["numpy"]}}
    assert "numpy" in f["summary"] and "iniconfig" not in f["summary"]
    # A test-runner plugin cannot change predictions: a note, not a cause.
    (note,) = doc["notes"]
    assert note["packages"] == {"iniconfig": {"recorded": metadata.version("iniconfig"),
                                              "current": changed["iniconfig"]}}


def test_diff_lists_the_packages_that_matter_first(numpy_venv: tuple[Path, dict[str, str]],
                                                   saved_tiny: Path) -> None:
    py, changed = numpy_venv
    res = envlock_cli("diff", str(saved_tiny), "--python", str(py), "--json", cwd=saved_tiny.parent)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    # iniconfig sorts before numpy by name; numpy comes first because it matters.
    assert doc["packages"] == [
        {"name": "numpy", "kind": "changed", "recorded": metadata.version("numpy"),
         "current": changed["numpy"], "matters": True},
        {"name": "iniconfig", "kind": "changed", "recorded": metadata.version("iniconfig"),
         "current": changed["iniconfig"], "matters": False},
    ]
    assert doc["findings"] == [] and doc["framework_error"] is None and doc["differences"] == 2
    human = envlock_cli("diff", str(saved_tiny), "--python", str(py), cwd=saved_tiny.parent).stdout
    assert human.index("numpy") < human.index("iniconfig")


# --- settings -----------------------------------------------------------------------------------


CONV_MODEL = """\
import sys
import keras
keras.utils.set_random_seed(0)
inp = keras.Input((16, 16, 8), name="image")
x = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inp)
x = keras.layers.Flatten(name="flat")(x)
model = keras.Model(inp, keras.layers.Dense(10, name="logits")(x))
model.save(sys.argv[1])
"""


def test_onednn_differs(tmp_path: Path) -> None:
    """A float32 Conv2D, whose bits oneDNN changes: saved with TF_ENABLE_ONEDNN_OPTS=0, checked
    with it forced on and --no-recorded-env. Both are forced: TensorFlow's default follows the
    CPU (on only where AVX-512/AMX exist), and this test must hold on any x86-64 CPU."""
    root = new_project(tmp_path / "conv", make_conv=CONV_MODEL)
    subprocess.run([sys.executable, "make_conv.py", "conv.keras"], cwd=root, check=True,
                   capture_output=True, timeout=600)
    saved = save(root / "conv.keras", env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert saved["probe_repeatable"] is True
    model = root / "conv.keras"
    doc = check_json(model, "--strategy", "current", "--no-recorded-env", env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert doc["status"] in ("within_tolerance", "mismatch")
    assert doc["outputs"][0]["max_abs_diff"] > 0  # oneDNN really changed the bits
    assert causes(doc) == ["onednn_differs"]
    assert finding(doc, "onednn_differs")["evidence"] == {"recorded": False, "current": True}
    # The recorded setting applied over the shell's: the same bits again, nothing to explain.
    same = check_json(model, "--strategy", "current", env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert same["status"] == "identical" and same["findings"] == []


@pytest.fixture(scope="session")
def mixed_precision_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter whose site-packages sets a global mixed_float16 policy at start-up (a .pth
    file, as a site-wide customisation does), seeing this dev venv's packages. Its python."""
    venv = tmp_path_factory.mktemp("mixed-site") / "venv"
    uv("venv", "-q", "--python", sys.executable, str(venv))
    (site,) = venv.glob("lib/python*/site-packages")
    dev_site = sysconfig.get_paths()["purelib"]
    (site / "00_dev_site.pth").write_text(f"import site; site.addsitedir({dev_site!r})\n")
    (site / "zz_mixed_precision.pth").write_text(
        "import keras; keras.config.set_dtype_policy('mixed_float16')\n")
    return venv / "bin" / "python"


@pytest.mark.parametrize("where", ["project_module", "site_startup"])
def test_dtype_policy_differs(where: str, project: Path, mixed_precision_site: Path) -> None:
    """A global mixed_float16 policy at check that was not there at save: set by a project module
    at import (tinylayers.py, ahead of its layers), or by the interpreter's site start-up."""
    python: Path | str = sys.executable
    if where == "project_module":
        src = project.parent / "tinylayers.py"
        imports = "from keras import ops\n"
        policy = "keras.config.set_dtype_policy('mixed_float16')\n"
        src.write_text(src.read_text().replace(imports, f"{imports}\n{policy}"))
    else:
        python = mixed_precision_site
    doc = check_json(project, "--strategy", "current", python=python)
    # Editing tinylayers.py also changed the module that defines the custom layers (issue 12.7):
    # said second, the setting it made first.
    assert causes(doc) == ["dtype_policy_differs"] + (["custom_object_changed"] if where == "project_module"
                                                      else [])
    assert finding(doc, "dtype_policy_differs")["evidence"] == {"recorded": "float32",
                                                                "current": "mixed_float16"}


def test_xla_differs(project: Path) -> None:
    doc = check_json(project, "--strategy", "current", "--no-recorded-env",
                     env={"TF_XLA_FLAGS": "--tf_xla_auto_jit=2"})
    assert causes(doc) == ["xla_differs"]
    f = finding(doc, "xla_differs")
    assert f["evidence"]["recorded"]["TF_XLA_FLAGS"] is None
    assert f["evidence"]["current"]["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2"
    # Without --no-recorded-env the shell's TF_XLA_FLAGS is not passed on: nothing to explain.
    same = check_json(project, "--strategy", "current", env={"TF_XLA_FLAGS": "--tf_xla_auto_jit=2"})
    assert same["status"] == "identical" and same["findings"] == []


NOISY_MODULE = '''\
import keras


@keras.saving.register_keras_serializable(package="noisy")
class AlwaysDropout(keras.layers.Layer):
    """Dropout that stays on at inference: it calls its sublayer with training=True."""

    def __init__(self, rate=0.5, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.dropout = keras.layers.Dropout(rate)

    def call(self, x):
        return self.dropout(x, training=True)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}
'''

NOISY_MODEL = """\
import sys
import keras
import noisy
keras.utils.set_random_seed(0)
inp = keras.Input((4,), name="features")
x = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
x = noisy.AlwaysDropout(0.5, name="always_dropout")(x)
model = keras.Model(inp, keras.layers.Dense(2, name="logits")(x))
model.save(sys.argv[1])
"""


def test_random_layer_at_inference(tmp_path: Path) -> None:
    root = new_project(tmp_path / "noisy", noisy=NOISY_MODULE, make_noisy=NOISY_MODEL)
    subprocess.run([sys.executable, "make_noisy.py", "noisy.keras"], cwd=root, check=True,
                   capture_output=True, timeout=600)
    saved = save(root / "noisy.keras")
    assert saved["probe_repeatable"] is False
    doc = check_json(root / "noisy.keras", "--strategy", "current")
    assert doc["status"] == "mismatch"
    assert causes(doc)[0] in ("random_layers_active", "nondeterministic_model")
    assert set(causes(doc)) <= {"random_layers_active", "nondeterministic_model"}
    nondet = finding(doc, "nondeterministic_model")
    assert nondet["details"] == {"in_process": False, "cross_process": False}


# --- hardware, from recorded real output ---------------------------------------------------------


def test_gpu_and_cuda_differ(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved where nvidia-smi answers with a real H100 recording (driver 590.48.01, CUDA 13.1),
    checked here, where there is none: both the GPU and the driver's CUDA differ."""
    sidecar = project.parent / "model.keras.envlock"
    shutil.rmtree(sidecar)
    fake = make_fake_nvidia_smi(tmp_path / "fake-bin", table="h100-mig-590.48.01.table.txt",
                                query="h100-mig-590.48.01.query.csv")
    save(project, env={"PATH": os.pathsep.join([str(fake.parent), os.environ["PATH"]])})
    manifest = json.loads((sidecar / "envlock.json").read_text())
    assert [g["name"] for g in manifest["gpu"]["gpus"]] == ["NVIDIA H100 80GB HBM3"]
    assert manifest["gpu"]["cuda_driver_version"] == "13.1"

    doc = check_json(project, "--strategy", "current")
    assert doc["status"] == "identical"
    assert causes(doc) == ["gpu_differs", "cuda_differs"]
    gpu = finding(doc, "gpu_differs")
    assert gpu["evidence"] == {"recorded": ["NVIDIA H100 80GB HBM3"], "current": []}
    assert finding(doc, "cuda_differs")["evidence"]["recorded"]["driver_cuda"] == "13.1"
    # tensorflow-cpu saw no GPU at save either: the model ran on the CPU both times.
    assert manifest["framework"]["gpus_visible"] == []
    assert gpu["details"]["framework_used_gpu"] is False and "ran on the CPU" in gpu["summary"]

    # So where the CPU differs as well, the CPU is the likelier cause and ranks first.
    use_recorded_cpu(monkeypatch)
    monkeypatch.chdir(project.parent)
    from envlock.commands.check import check

    both = check(project, strategy="current").to_json()
    assert causes(both) == ["cpu_differs", "gpu_differs", "cuda_differs"]


def use_recorded_cpu(monkeypatch: pytest.MonkeyPatch) -> Path:
    """check() reads the target's CPU from a recorded /proc/cpuinfo of a CPU that is not this one."""
    import envlock.commands.check
    from envlock.facts.host import platform_facts

    here = parse_cpuinfo(Path("/proc/cpuinfo").read_text())["model"]
    recording = next(p for p in sorted((DATA / "cpuinfo").glob("x86_64-*.cpuinfo"))
                     if parse_cpuinfo(p.read_text())["model"] != here)
    monkeypatch.setattr(envlock.commands.check, "platform_facts",
                        functools.partial(platform_facts, cpuinfo_path=recording))
    return recording


def test_cpu_differs(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's CPU facts read from a recorded /proc/cpuinfo of another CPU (there is one CPU
    here): check, in process, against the facts recorded by a real save on this machine."""
    from envlock.commands.check import check

    here = parse_cpuinfo(Path("/proc/cpuinfo").read_text())["model"]
    recording = use_recorded_cpu(monkeypatch)
    monkeypatch.chdir(project.parent)
    doc = check(project, strategy="current").to_json()
    assert doc["status"] == "identical"
    assert causes(doc) == ["cpu_differs"]
    f = finding(doc, "cpu_differs")
    assert f["evidence"]["recorded"]["model"] == here
    assert f["evidence"]["current"]["model"] == parse_cpuinfo(recording.read_text())["model"]


# --- other Keras, other Python (slow: each builds a TensorFlow venv) ------------------------------


# The same small model trained in any Keras: a script is an import of `keras`, then this.
TRAIN_SMALL_MODEL = """\
keras.utils.set_random_seed(0)
inp = keras.Input((4,), name="features")
x = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
model = keras.Model(inp, keras.layers.Dense(2, name="logits")(x))
model.compile(optimizer="adam", loss="mse")
X = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
model.fit(X, X[:, :2] * 3.0, epochs=2, verbose=0)
model.save(sys.argv[1])
"""
KERAS2_TRAIN = "import sys\nimport numpy as np\nfrom tensorflow import keras\n" + TRAIN_SMALL_MODEL


@pytest.fixture(scope="session")
def keras2_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A legacy .h5 trained and `envlock save`d in a venv with tensorflow-cpu 2.15 (Keras 2)."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    base = sys.executable if minor in ("3.9", "3.10", "3.11") else (
        find_pyenv_python("3.11") or find_pyenv_python("3.10"))
    if base is None:
        pytest.skip("TensorFlow 2.15 needs Python 3.9-3.11")
    root = tmp_path_factory.mktemp("keras2")
    venv = root / "venv"
    py = venv / "bin" / "python"
    uv("venv", "-q", "--python", str(base), str(venv))
    uv("pip", "install", "-q", "--python", str(py), "tensorflow-cpu==2.15.*", "-e", str(ROOT))
    assert python_in(root, "import keras; print(keras.__version__)", python=py).startswith("2.15.")
    (root / "train2.py").write_text(KERAS2_TRAIN)
    subprocess.run([str(py), "train2.py", "legacy.h5"], cwd=root, check=True, capture_output=True,
                   timeout=600)
    save(root / "legacy.h5", python=py)
    return root / "legacy.h5"


@pytest.mark.slow
def test_keras_major_differs(keras2_h5: Path) -> None:
    manifest = json.loads((keras2_h5.parent / "legacy.h5.envlock" / "envlock.json").read_text())
    assert manifest["framework"]["keras_major"] == 2 and manifest["model"]["format"] == "h5"
    doc = check_json(keras2_h5, "--strategy", "current")
    # Keras 2 → 3 is also TensorFlow 2.15 → 2.21 and numpy 1 → 2: true, and second.
    assert causes(doc)[:2] == ["keras_major_differs", "package_versions_differ"]
    f = finding(doc, "keras_major_differs")
    assert f["evidence"]["recorded"].startswith("2.15.")
    assert f["evidence"]["current"] == metadata.version("keras")
    packages = finding(doc, "package_versions_differ")["details"]["packages"]
    assert {"keras", "tensorflow-cpu", "numpy"} <= set(packages)


@pytest.fixture(scope="session")
def saved_on_other_python(saved_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/projects/tiny trained and saved in a venv of another Python minor synced from
    saved_tiny's own lock (hash-checked): the same packages, only Python differs."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = next((p for m in ("3.12", "3.13", "3.11") if m != here and (p := find_pyenv_python(m))), None)
    if other is None:
        pytest.skip("needs another Python minor under pyenv")
    root = tmp_path_factory.mktemp("other-python")
    venv = root / "venv"
    py = venv / "bin" / "python"
    uv("venv", "-q", "--python", str(other), str(venv))
    uv("pip", "sync", "-q", "--require-hashes", "--python", str(py),
       str(saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt"))
    uv("pip", "install", "-q", "--no-deps", "--python", str(py), "-e", str(ROOT))
    project = new_project(root / "tiny")
    subprocess.run([str(py), "train.py", "model.keras"], cwd=project, check=True, capture_output=True,
                   timeout=600)
    save(project / "model.keras", python=py)
    return project / "model.keras"


@pytest.mark.slow
def test_python_version_differs(saved_on_other_python: Path) -> None:
    import platform

    manifest = json.loads((saved_on_other_python.parent / "model.keras.envlock" / "envlock.json").read_text())
    recorded = manifest["python"]["version"]
    doc = check_json(saved_on_other_python, "--strategy", "current")
    assert causes(doc) == ["python_version_differs"]
    assert finding(doc, "python_version_differs")["evidence"] == {"recorded": recorded,
                                                                  "current": platform.python_version()}


PLAINACT = """\
from keras import ops

SLOPE = 1.0


def act(x):
    return ops.tanh(SLOPE * x)
"""

REGACT = """\
import keras
import plainact

keras.saving.register_keras_serializable(package="reg", name="act")(plainact.act)
"""

MAKE_REGACT = """\
import sys
import keras
import regact  # noqa: F401  (registers reg>act)
import plainact
keras.utils.set_random_seed(0)
inp = keras.Input((4,), name="features")
x = keras.layers.Dense(8, activation=plainact.act, name="hidden")(inp)
keras.Model(inp, keras.layers.Dense(2, name="logits")(x)).save(sys.argv[1])
"""


@pytest.mark.slow
def test_custom_objects_module_changed(tmp_path: Path) -> None:
    """A module given with --custom-objects that only registers a function (defined elsewhere,
    unchanged) is edited to also set what the function reads: no object's source changed, the
    predictions did. check names the registering module."""
    root = new_project(tmp_path / "reg", plainact=PLAINACT, regact=REGACT, make_regact=MAKE_REGACT)
    subprocess.run([sys.executable, "make_regact.py", "reg.keras"], cwd=root, check=True,
                   capture_output=True, timeout=600)
    save(root / "reg.keras", "--custom-objects", "regact")
    clean = check_json(root / "reg.keras", "--strategy", "current")
    assert clean["status"] == "identical" and clean["findings"] == [], clean
    (root / "regact.py").write_text(REGACT + "plainact.SLOPE = 3.0\n")
    doc = check_json(root / "reg.keras", "--strategy", "current")
    assert doc["status"] == "mismatch"
    assert causes(doc) == ["custom_object_changed"]
    f = finding(doc, "custom_object_changed")
    assert "regact" in f["summary"] and f["details"]["modules"] == ["regact"]
    assert f["details"]["module_files"] == [str((root / "regact.py").resolve())]
    assert "code/regact.py" in f["fix"]
