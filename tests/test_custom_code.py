"""Custom code saved with a model, for real: trained models, real venvs, real workers.

(a) A layer class of an installed package that is not registered with Keras, plus a project
    module given with --custom-objects that registers another class of that package: saved by
    the CLI in a venv holding TensorFlow and that package (a wheel from a local index, so the
    lock pins it with its hash), then run from a host without TensorFlow in another folder.
(b) A training script that defines a layer inside an `if` block, a TextVectorization
    `standardize` function that calls a local helper module, a registered activation, and
    imports envlock: saved with envlock.save, run from a host without TensorFlow elsewhere.
(c) Issue 12.7: a module-level helper that the layer calls is edited; check says that the
    layer's module, not the class itself, changed.
(d) The capture alone, fast: what it writes imports in a bare interpreter (no envlock, no
    numpy) from the code folder alone, and computes what the script computed.

Every run is compared bit for bit with model.predict in the environment that trained the model,
and `envlock check` in that unchanged environment must say identical with no finding.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_localindex, requires_tf, run_cli
from test_legacy import Stack, build_stack
from test_run import UV, _env

pytestmark = [requires_tf]

li = load_localindex()

# --- (a) a class of an installed package ----------------------------------------------------------

DIST = "envlock-zz-layers"  # not on PyPI: the lock gets its hash from the local index
ZZ_FILES = {
    "zzlayers/__init__.py": "",
    "zzlayers/layers.py": '''\
"""Layers of an installed package, not registered with Keras."""

import keras
from keras import ops


def _bias(units):
    return ops.linspace(-1.0, 1.0, units)


class Offset(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="w")

    def call(self, x):
        return x * self.w + _bias(x.shape[-1])


class Scale2(keras.layers.Layer):
    def call(self, x):
        return x * 2.0
''',
}
# A module of the user's project that registers a class of the package under its own name.
ZZ_REGISTER = '''\
import keras

from zzlayers.layers import Scale2

keras.saving.register_keras_serializable(package="zz")(Scale2)
'''
ZZ_TRAIN = '''\
import sys

import keras
import numpy as np

import zzreg  # noqa: F401
from zzlayers.layers import Offset, Scale2

keras.utils.set_random_seed(0)
inp = keras.Input((6,), name="features")
h = Offset(name="offset")(inp)
h = Scale2(name="scale2")(h)
model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
model.compile("adam", "mse")
rng = np.random.default_rng(0)
x = rng.standard_normal((80, 6)).astype("float32")
model.fit(x, x[:, :3], epochs=1, verbose=0)
model.save("model.keras")
np.save("x.npy", x)
np.save("ref.npy", model.predict(x, batch_size=32, verbose=0))
'''


@pytest.fixture(scope="session")
def zz_index(tmp_path_factory: pytest.TempPathFactory) -> Any:
    wheels = tmp_path_factory.mktemp("zz-wheels")
    wheel = li.write_wheel(wheels, DIST, "1.0", ZZ_FILES, metadata={"top_level.txt": "zzlayers\n"})
    index = li.LocalIndex()
    index.add("zz", DIST, li.Listed.of(wheel))
    index.wheels = wheels
    yield index
    index.close()


@pytest.fixture(scope="session")
def zz_saved(tmp_path_factory: pytest.TempPathFactory, zz_index: Any) -> tuple[Stack, Path]:
    """A Python 3.11 venv with this TensorFlow and Keras, the package and envlock; a model
    trained there and saved with `envlock save --custom-objects zzreg`."""
    root = tmp_path_factory.mktemp("zz")
    pins = [f"tensorflow-cpu=={metadata.version('tensorflow-cpu')}", f"keras=={metadata.version('keras')}",
            f"numpy=={metadata.version('numpy')}", DIST, "--find-links", str(zz_index.wheels)]
    stack = build_stack(root, "venv", "3.11", pins)
    project = root / "project"
    project.mkdir()
    (project / "zzreg.py").write_text(ZZ_REGISTER)
    (project / "train.py").write_text(ZZ_TRAIN)
    stack.run(stack.python, "train.py", cwd=project)
    stack.envlock("save", "model.keras", "--custom-objects", "zzreg", "--probe", "x.npy", cwd=project,
                  env={"PIP_EXTRA_INDEX_URL": zz_index.url("zz")})
    return stack, project / "model.keras"


def _manifest(model: Path) -> dict[str, Any]:
    return json.loads((model.parent / f"{model.name}.envlock" / "envlock.json").read_text())


def _bitwise(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _run_from_host(host: Path, model: Path, x: Path, where: Path, *extra: str) -> np.ndarray:
    where.mkdir(parents=True, exist_ok=True)
    out = where / "y.npy"
    res = subprocess.run([str(host / "bin" / "envlock"), "run", str(model), "--input", str(x),
                          "--output", str(out), "--json", *extra], cwd=where, env=_env(ENVLOCK_UV=str(UV)),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["validation"]["status"] == "identical"
    return np.load(out)


def _check_clean(doc: dict[str, Any]) -> None:
    assert doc["status"] == "identical", doc
    assert doc["findings"] == [], doc["findings"]


@pytest.mark.slow
def test_unregistered_class_of_an_installed_package_and_a_registering_module(
        zz_saved: tuple[Stack, Path], zz_index: Any, host_venv: Path, tmp_path: Path) -> None:
    stack, model = zz_saved
    m = _manifest(model)
    by_name = {c["qualname"]: c for c in m["custom_objects"]}
    offset = by_name["Offset"]
    assert offset["module"] == "zzlayers.layers" and offset["in_site_packages"] is True
    assert offset["distribution"] == {"name": DIST, "version": "1.0"} and offset["vendored"] is None
    assert by_name["Scale2"]["registered_name"] == "zz>Scale2"
    lock = (model.parent / "model.keras.envlock" / "requirements.lock.txt").read_text()
    wheel_sha = hashlib.sha256(next(zz_index.wheels.glob("*.whl")).read_bytes()).hexdigest()
    assert f"{DIST}==1.0" in lock and f"sha256:{wheel_sha}" in lock
    [reg] = m["custom_object_modules"]
    assert reg["module"] == "zzreg" and reg["vendored"] == "code/zzreg.py"
    assert reg["sha256"] == hashlib.sha256((model.parent / "zzreg.py").read_bytes()).hexdigest()

    # From a host without TensorFlow, in a folder where zzreg is not importable: the rebuilt
    # environment has the package (from the lock), the sidecar has zzreg, and run imports it.
    y = _run_from_host(host_venv, model, model.parent / "x.npy", tmp_path / "elsewhere",
                       "--find-links", str(zz_index.wheels))
    assert _bitwise(y, np.load(model.parent / "ref.npy"))

    done = stack.envlock("check", "model.keras", "--json", cwd=model.parent)
    _check_clean(json.loads(done.stdout))

    # `envlock env --custom-objects` imports the modules in the locked environment, as run does.
    env_cmd = [str(host_venv / "bin" / "envlock"), "env", str(model), "--find-links", str(zz_index.wheels),
               "--json", "--custom-objects"]
    where = tmp_path / "elsewhere"
    res = subprocess.run([*env_cmd, "zzlayers.layers"], cwd=where, env=_env(ENVLOCK_UV=str(UV)),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["custom_objects"] == ["zzlayers.layers"]
    res = subprocess.run([*env_cmd, "zzreg"], cwd=where, env=_env(ENVLOCK_UV=str(UV)),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 4 and "zzreg" in res.stderr, res.stderr


# --- (b) layers and functions defined in the training script --------------------------------------

# A module whose only use is an activation it registers: the file names it "act>relu2", with
# module "builtins"; only the saving process knows where it lives.
ACTIVATIONS = '''\
import keras


@keras.saving.register_keras_serializable(package="act")
def relu2(x):
    return keras.ops.relu(x) * 2.0
'''
TEXTUTILS = '''\
import tensorflow as tf

SEPARATORS = "[.,;]"


def clean(x):
    return tf.strings.regex_replace(tf.strings.lower(x), SEPARATORS, " ")
'''
SCRIPT = '''\
"""Train and save from one script, as the README does."""
import sys

import keras
import numpy as np
import tensorflow as tf

import activations
import envlock
from textutils import clean

envlock.prewarm()
USE_TOKENS = True
if USE_TOKENS:
    class ToTokens(keras.layers.Layer):
        """Numbers to one string of tokens, "3.1.4", for the TextVectorization after it."""

        def call(self, x):
            words = tf.strings.as_string(tf.cast(tf.round(x), "int32"))
            return tf.strings.reduce_join(words, axis=-1, separator=".")


def standardize(x):
    return clean(x)


@keras.saving.register_keras_serializable(package="script")
def scaled_tanh(x):
    return 2.0 * keras.ops.tanh(x)


keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.integers(0, 9, size=(70, 5)).astype("float32")
tv = keras.layers.TextVectorization(max_tokens=16, standardize=standardize, output_sequence_length=5)
tv.adapt(ToTokens()(x))
inp = keras.Input((5,), name="numbers")
h = tv(ToTokens(name="tokens")(inp))
h = keras.layers.Embedding(16, 4, name="embed")(h)
h = keras.layers.GlobalAveragePooling1D()(h)
h = keras.layers.Dense(4, activation=activations.relu2, name="hidden")(h)
model = keras.Model(inp, keras.layers.Dense(2, activation=scaled_tanh, name="out")(h))
model.compile("adam", "mse")
model.fit(x, x[:, :2] / 9.0, epochs=2, verbose=0)
np.save("x.npy", x)
np.save("ref.npy", model.predict(x, batch_size=32, verbose=0))
envlock.save(model, "model.keras", probe=x[:32])
'''


@pytest.mark.slow
def test_layers_and_functions_of_the_training_script(host_venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "textutils.py").write_text(TEXTUTILS)
    (project / "activations.py").write_text(ACTIVATIONS)
    (project / "train.py").write_text(SCRIPT)
    subprocess.run([sys.executable, "train.py"], cwd=project, check=True, capture_output=True, timeout=900)
    model = project / "model.keras"
    m = _manifest(model)
    by_name = {c["qualname"]: c for c in m["custom_objects"]}
    relu2 = by_name.pop("relu2")
    assert (relu2["module"], relu2["registered_name"], relu2["vendored"]) == (
        "activations", "act>relu2", "code/activations.py")
    assert set(by_name) == {"ToTokens", "standardize", "scaled_tanh"}
    assert all(c["defined_in_main"] and c["vendored"] == "code/__envlock_main__.py" for c in by_name.values())
    assert by_name["standardize"]["kind"] == "function"
    assert by_name["scaled_tanh"]["registered_name"] == "script>scaled_tanh"
    assert [r["module"] for r in m["custom_object_modules"]] == ["textutils"]
    assert (model.parent / "model.keras.envlock" / "code" / "textutils.py").read_text() == TEXTUTILS

    # What was captured imports and runs where neither the script, nor textutils, nor envlock is.
    y = _run_from_host(host_venv, model, project / "x.npy", tmp_path / "elsewhere")
    assert _bitwise(y, np.load(project / "ref.npy"))

    res = run_cli("check", "model.keras", "--json", cwd=project)
    assert res.returncode == 0, res.stderr
    _check_clean(json.loads(res.stdout))


# --- (c) issue 12.7: the layer's module changed, not the layer ------------------------------------

MYLAYERS = '''\
import keras


def offset():
    return 0.5


@keras.saving.register_keras_serializable(package="mine")
class Shifted(keras.layers.Layer):
    def call(self, x):
        return x + offset()
'''
MAKE = '''\
import keras
import numpy as np

import mylayers

keras.utils.set_random_seed(0)
inp = keras.Input((4,), name="x")
model = keras.Model(inp, keras.layers.Dense(2, name="out")(mylayers.Shifted(name="shifted")(inp)))
model.save("model.keras")
'''


@pytest.mark.slow
def test_edited_helper_in_the_layers_module_is_custom_object_changed(tmp_path: Path) -> None:
    (tmp_path / "mylayers.py").write_text(MYLAYERS)
    (tmp_path / "make.py").write_text(MAKE)
    subprocess.run([sys.executable, "make.py"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    res = run_cli("save", "model.keras", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (tmp_path / "mylayers.py").write_text(MYLAYERS.replace("return 0.5", "return 0.25"))
    # --strategy current: the user's module (edited) is what loads, not the sidecar's copy.
    res = run_cli("check", "model.keras", "--strategy", "current", "--json", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["status"] == "mismatch"
    codes = [f["code"] for f in doc["findings"]]
    assert "custom_object_changed" in codes[:2], codes
    f = doc["findings"][codes.index("custom_object_changed")]
    assert f["details"]["changed"] == ["module"]
    assert "defining module mylayers" in f["summary"] and "own source is unchanged" in f["summary"]
    recorded, current = f["evidence"]["recorded"], f["evidence"]["current"]
    assert recorded["class"] == current["class"] and recorded["module"] != current["module"]


# --- the capture itself, fast: what it writes imports where the script and envlock are not --------

CAPTURE_SCRIPT = '''\
"""Stands for a training script; its objects are captured, then its training code runs."""
import json
import math
import sys

import envlock
import helpers_two as h2
from envlock.sidecar.customcode import capture_main
from helpers_one import *

RATE = 3.0
DEBUG = False
if not DEBUG:
    class Layer:
        """A docstring whose second line
starts at column 0, inside an indented block."""

        def call(self, x):
            scale = RATE  # a local name is not a module-level one
            return twice(x) * scale + h2.inc(x)
try:
    def act(x):
        return math.tanh(x)
except ImportError:
    pass

model = None  # the training: never captured
cap = capture_main([Layer, act])
out = sys.argv[1]
with open(out + "/__envlock_main__.py", "w") as fh:
    fh.write(cap.source)
for rel, src in cap.helpers.items():
    with open(out + "/" + rel, "w") as fh, open(src) as inp:
        fh.write(inp.read())
print(json.dumps({"helpers": sorted(cap.helpers), "objects": cap.objects,
                  "values": [Layer().call(2.0), act(0.5)]}))
'''


def test_captured_main_imports_without_the_script_envlock_or_the_training(tmp_path: Path) -> None:
    from test_legacy import base_python

    bare = base_python(f"{sys.version_info.major}.{sys.version_info.minor}")
    if bare is None:
        pytest.skip("no bare interpreter of this Python version")
    project, code = tmp_path / "project", tmp_path / "code"
    project.mkdir()
    code.mkdir()
    (project / "train.py").write_text(CAPTURE_SCRIPT)
    (project / "helpers_one.py").write_text("def twice(x):\n    return 2 * x\n")
    (project / "helpers_two.py").write_text("def inc(x):\n    return x + 1\n")
    done = subprocess.run([sys.executable, "train.py", str(code)], cwd=project, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["helpers"] == ["helpers_one.py", "helpers_two.py"]
    assert doc["objects"] == {"Layer": "Layer", "act": "act"}
    # A Python with neither envlock nor numpy, in the code folder alone, as a rebuilt
    # environment's worker imports it.
    check = ("import json, __envlock_main__ as m\n"
             "print(json.dumps([m.Layer().call(2.0), m.act(0.5), hasattr(m, 'model')]))")
    got = subprocess.run([str(bare), "-I", "-c", f"import sys; sys.path.insert(0, '.')\n{check}"],
                         cwd=code, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr + (code / "__envlock_main__.py").read_text()
    assert json.loads(got.stdout) == [*doc["values"], False]
