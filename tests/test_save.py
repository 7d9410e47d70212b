"""envlock save: a real TensorFlow model with custom objects, its sidecar checked field by field."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import requires_tf, run_cli, run_python

pytestmark = requires_tf


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def manifest_of(model: Path) -> dict:
    return json.loads((model.parent / (model.name + ".envlock") / "envlock.json").read_text())


def test_sidecar_files_and_integrity_list(saved_tiny: Path) -> None:
    sc = saved_tiny.parent / "model.keras.envlock"
    names = sorted(p.relative_to(sc).as_posix() for p in sc.rglob("*") if p.is_file())
    assert names == ["REPRODUCE.md", "code/tinylayers.py", "envlock.json", "probe.npz",
                     "pylock.toml", "requirements.lock.txt"]
    m = manifest_of(saved_tiny)
    assert m["schema"] == "envlock.manifest" and m["schema_version"] == 1
    assert set(m["files"]) == set(names) - {"envlock.json"}
    for rel, digest in m["files"].items():
        assert sha256(sc / rel) == digest


def test_model_python_platform_fields(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    model = m["model"]
    assert model["file"] == "model.keras" and model["format"] == "keras"
    assert model["sha256"] == sha256(saved_tiny)
    assert model["keras_version"] == metadata.version("keras")
    assert model["inputs"] == [{"name": "features", "shape": [None, 4], "dtype": "float32"}]
    assert model["outputs"] == [{"name": "logits", "shape": [2], "dtype": "float32"}]
    assert m["python"]["version"] == platform.python_version()
    assert m["python"]["implementation"] == platform.python_implementation().lower()
    assert m["platform"]["machine"] == platform.machine()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model_name = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                      if ln.startswith("model name"))
    assert m["platform"]["cpu"]["model"] == model_name


def test_framework_cuda_and_determinism_fields(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    fw = m["framework"]
    assert fw["versions"]["keras"] == metadata.version("keras")
    assert fw["versions"]["numpy"] == metadata.version("numpy")
    assert fw["backend"] == "tensorflow" and fw["keras_major"] == 3
    assert m["cuda"]["is_cuda_build"] is False  # tensorflow-cpu
    d = m["determinism"]
    # TensorFlow's default follows the CPU (on only with AVX-512/AMX): read from TF itself, a bool
    # either way; test_onednn_state_forced_both_ways pins the values.
    assert isinstance(d["onednn"]["effective"], bool)
    assert d["op_determinism"] is False
    assert d["dtype_policy"] == "float32" and d["floatx"] == "float32"
    assert d["intra_op_threads"] == 0 and d["inter_op_threads"] == 0
    assert d["hash_randomization"] is True
    assert "TF_ENABLE_ONEDNN_OPTS" in d["env"]


def test_custom_objects_recorded_and_vendored(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    by_name = {c["qualname"]: c for c in m["custom_objects"]}
    assert set(by_name) == {"Scale", "swish2"}
    scale = by_name["Scale"]
    assert scale["module"] == "tinylayers" and scale["registered_name"] == "tiny>Scale"
    assert scale["kind"] == "class" and len(scale["source_sha256"]) == 64
    assert scale["in_site_packages"] is False and scale["vendored"] == "code/tinylayers.py"
    assert by_name["swish2"]["kind"] == "function" and by_name["swish2"]["registered_name"] == "tiny>swish2"
    vendored = saved_tiny.parent / "model.keras.envlock" / "code" / "tinylayers.py"
    assert vendored.read_bytes() == (saved_tiny.parent / "tinylayers.py").read_bytes()
    assert scale["file_sha256"] == sha256(vendored)


def test_weights_fingerprint_from_the_reloaded_model(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    w = m["weights"]
    assert w["restored"] is True and w["mismatched_layers"] == []
    paths = [v["path"] for v in w["variables"]]
    assert paths == ["scale/w", "hidden/kernel", "hidden/bias", "logits/kernel", "logits/bias"]
    # Recompute the fingerprint from the arrays stored in the file itself, independently.
    import io
    import zipfile

    import h5py
    with zipfile.ZipFile(saved_tiny) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5"))) as f:
        kernel = f["layers/dense_1/vars/0"][()]  # groups are named by class, not by layer
    a = np.ascontiguousarray(kernel)
    h = hashlib.sha256(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode() + a.tobytes()).hexdigest()
    assert w["variables"][3]["sha256"] == h


def test_probe_is_seeded_and_saved_without_pickle(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    probe = m["probe"]
    assert probe["source"] == "generated" and probe["seed"] == 0 and probe["batch_size"] == 32
    assert probe["repeat_bitwise_equal"] is True
    assert probe["tolerance"] == {"atol": 1e-6, "rtol": 1e-5}
    with np.load(saved_tiny.parent / "model.keras.envlock" / "probe.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["input__features", "output__logits"]
        x = npz["input__features"]
        assert x.shape == (16, 4) and x.dtype == np.float32
        assert npz["output__logits"].shape == (16, 2)
    expected = np.random.default_rng(0).standard_normal((16, 4)).astype("float32")
    assert np.array_equal(x, expected)


def test_packages_every_distribution_hashed(saved_tiny: Path) -> None:
    m = manifest_of(saved_tiny)
    pk = m["packages"]
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}
    assert pk["count"] >= len(installed) - 1  # everything but envlock itself
    assert pk["missing_hashes"] == []
    assert [r["name"] for r in pk["risks"]] == []  # envlock (editable) is excluded, not a risk
    text = (saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt").read_text()
    assert f"keras=={metadata.version('keras')} \\" in text
    assert "--hash=sha256:" in text
    assert "envlock==" not in text


def test_pylock_validates_with_packaging(saved_tiny: Path) -> None:
    from packaging.pylock import Pylock

    text = (saved_tiny.parent / "model.keras.envlock" / "pylock.toml").read_text()
    lock = Pylock.from_dict(tomllib.loads(text))
    names = {p.name for p in lock.packages}
    assert "keras" in names and "numpy" in names
    assert all(p.wheels or p.sdist or p.directory or p.vcs or p.archive for p in lock.packages)


def test_requirements_lock_installs_with_uv_pip_sync(saved_tiny: Path, tmp_path: Path) -> None:
    """The lock of a whole TensorFlow environment syncs into a fresh venv, hash-checked."""
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    venv = tmp_path / "venv"
    lockfile = saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "sync", "-q", "--require-hashes", "--python", str(venv / "bin/python"),
                    str(lockfile)], check=True, capture_output=True, text=True)
    frozen = subprocess.run([uv, "pip", "freeze", "--python", str(venv / "bin/python")],
                            check=True, capture_output=True, text=True).stdout
    got = {ln.split("==")[0].lower() for ln in frozen.splitlines() if "==" in ln}
    want = {ln.split("==")[0].lower() for ln in lockfile.read_text().splitlines()
            if "==" in ln and not ln.startswith("#")}
    assert got == want


@pytest.mark.slow
def test_requirements_lock_installs_with_plain_pip(saved_tiny: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lockfile = saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--require-hashes",
                    "--no-deps", "-r", str(lockfile)], check=True, capture_output=True, text=True)
    check = subprocess.run([str(venv / "bin/python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_reproduce_md_rendered(saved_tiny: Path) -> None:
    text = (saved_tiny.parent / "model.keras.envlock" / "REPRODUCE.md").read_text()
    assert f"uv python install {platform.python_version()}" in text
    assert "uv pip sync" in text and "--require-hashes" in text
    assert "tinylayers.Scale" in text and "code/tinylayers.py" in text


def test_show_human_and_json(saved_tiny: Path) -> None:
    res = run_cli("show", str(saved_tiny))
    assert res.returncode == 0, res.stderr
    assert "model.keras" in res.stdout and "tinylayers.Scale" in res.stdout
    res = run_cli("show", str(saved_tiny), "--json")
    doc = json.loads(res.stdout)
    assert doc["schema"] == "envlock.show/1"
    assert set(doc) == {"schema", "sidecar", "manifest"}
    assert doc["manifest"]["model"]["file"] == "model.keras"


def _files_of(sidecar: Path) -> list[str]:
    return sorted(p.relative_to(sidecar).as_posix() for p in sidecar.rglob("*") if p.is_file())


def test_one_changed_byte_in_any_file_is_refused(saved_tiny: Path, tmp_path: Path) -> None:
    src = saved_tiny.parent / "model.keras.envlock"
    for rel in _files_of(src):
        work = tmp_path / rel.replace("/", "_")
        work.mkdir()
        shutil.copy(saved_tiny, work / "model.keras")
        shutil.copytree(src, work / "model.keras.envlock")
        target = work / "model.keras.envlock" / rel
        data = bytearray(target.read_bytes())
        i = len(data) // 2
        data[i] = (data[i] + 1) % 256
        target.write_bytes(bytes(data))
        res = run_cli("show", str(work / "model.keras"))
        assert res.returncode == 2, (rel, res.stdout, res.stderr)
        first = res.stderr.splitlines()[0]
        assert first.startswith("envlock: error:") and rel in first, (rel, res.stderr)
        assert "Traceback" not in res.stderr


def test_added_file_and_unknown_schema_are_refused(saved_tiny: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(saved_tiny.parent / "model.keras.envlock", work / "model.keras.envlock")
    shutil.copy(saved_tiny, work / "model.keras")
    (work / "model.keras.envlock" / "code" / "evil.py").write_text("import os\n")
    res = run_cli("show", str(work / "model.keras"))
    assert res.returncode == 2 and "code/evil.py" in res.stderr
    (work / "model.keras.envlock" / "code" / "evil.py").unlink()
    mpath = work / "model.keras.envlock" / "envlock.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    res = run_cli("show", str(work / "model.keras"))
    assert res.returncode == 2 and "schema version 99" in res.stderr and "upgrade envlock" in res.stderr


def _bad_inputs(root: Path) -> dict[str, Path]:
    (root / "notamodel.keras").write_text("hello, I am text\n")
    good = root / "good.keras"
    corrupt = root / "corrupt.keras"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "empty_dir").mkdir()
    (root / "random.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    return {
        "missing": root / "nope.keras",
        "not a model": root / "notamodel.keras",
        "corrupt archive": corrupt,
        "no SavedModel": root / "empty_dir",
        "hdf5 without a model": root / "random.h5",
    }


def test_bad_model_paths_exit_2_one_line_nothing_written(tiny_project: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_project / "model.keras", tmp_path / "good.keras")
    for what, path in _bad_inputs(tmp_path).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        res = run_cli("save", str(path), cwd=tmp_path)
        assert res.returncode == 2, (what, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("envlock: error:"), (what, res.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, what


def test_weights_not_restored_fails_naming_the_layer(tiny_project: Path, tmp_path: Path) -> None:
    for f in ("tinylayers.py", "train.py"):
        shutil.copy(tiny_project / f, tmp_path / f)
    run_python("train.py", "forgetful.keras", "--forgetful", cwd=tmp_path)
    res = run_cli("save", "forgetful.keras", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "weights_not_restored" in res.stderr and "forgetful" in res.stderr
    assert not (tmp_path / "forgetful.keras.envlock").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    res = run_cli("save", "forgetful.keras", "--allow-mismatch", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "envlock.save/1"
    assert set(doc) == {"schema", "model", "sidecar", "packages", "hashed", "missing_hashes", "risks",
                        "custom_objects", "weights_overall", "weights_restored", "mismatched_layers",
                        "probe_inputs", "probe_repeatable", "warnings", "seconds"}
    assert doc["weights_restored"] is False and doc["mismatched_layers"] == ["forgetful"]


API_SCRIPT = r'''
import json, sys
import keras, numpy as np
import envlock.commands.save as es
import tinylayers

@keras.saving.register_keras_serializable(package="script")
class Shift(keras.layers.Layer):
    def call(self, x):
        return x + 1.0

keras.utils.set_random_seed(1)
inp = keras.Input((4,), name="features")
x = tinylayers.Scale(name="scale")(inp)
x = Shift(name="shift")(x)
if sys.argv[1] == "forgetful":
    x = tinylayers.ForgetfulDense(2, name="forgetful")(x)
model = keras.Model(inp, keras.layers.Dense(2, name="out")(x))
probe = np.random.default_rng(5).standard_normal((10, 4)).astype("float32")
try:
    result = es.save(model, "api.keras", probe=probe)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps(result.to_json()))
'''


def _api(tiny_project: Path, tmp_path: Path, variant: str) -> dict:
    shutil.copy(tiny_project / "tinylayers.py", tmp_path / "tinylayers.py")
    (tmp_path / "api_script.py").write_text(API_SCRIPT)
    proc = subprocess.run([sys.executable, "api_script.py", variant], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_api_save_with_real_probe_and_main_script_layer(tiny_project: Path, tmp_path: Path) -> None:
    doc = _api(tiny_project, tmp_path, "ok")
    assert doc["weights_restored"] is True
    m = manifest_of(tmp_path / "api.keras")
    assert m["probe"]["source"] != "generated"
    with np.load(tmp_path / "api.keras.envlock" / "probe.npz", allow_pickle=False) as npz:
        want = np.random.default_rng(5).standard_normal((10, 4)).astype("float32")
        assert np.array_equal(npz["input__features"], want)
    shift = next(c for c in m["custom_objects"] if c["qualname"] == "Shift")
    assert shift["defined_in_main"] is True and shift["vendored"] == "code/__envlock_main__.py"
    main_src = (tmp_path / "api.keras.envlock" / "code" / "__envlock_main__.py").read_text()
    assert "class Shift" in main_src and "import keras" in main_src
    assert any("__main__" in w for w in m["warnings"])


def test_api_save_weights_not_restored_compared_with_memory(tiny_project: Path, tmp_path: Path) -> None:
    doc = _api(tiny_project, tmp_path, "forgetful")
    assert doc["error"] == "WeightsNotRestoredError"
    assert "forgetful" in doc["message"] and "memory" in doc["message"]
    assert not (tmp_path / "api.keras.envlock").exists()


def test_offline_save_succeeds_and_lists_packages_without_hashes(tiny_project: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_project / "model.keras", tmp_path / "model.keras")
    shutil.copy(tiny_project / "tinylayers.py", tmp_path / "tinylayers.py")
    env = {"ENVLOCK_OFFLINE": "1", "ENVLOCK_HOME": str(tmp_path / "home")}  # empty hash cache
    res = run_cli("save", "model.keras", "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["hashed"] == 0 and len(doc["missing_hashes"]) == doc["packages"] > 10
    assert "numpy" in doc["missing_hashes"]
    assert any("no sha256" in w for w in doc["warnings"])
    text = (tmp_path / "model.keras.envlock" / "requirements.lock.txt").read_text()
    assert f"numpy=={metadata.version('numpy')}" in text and "--hash=" not in text
    assert manifest_of(tmp_path / "model.keras")["packages"]["complete"] is False


REGISTERING_MODULE = r'''
import keras

@keras.saving.register_keras_serializable(package="demo")
class Gain(keras.layers.Layer):
    def build(self, input_shape):
        self.g = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="g")
    def call(self, x):
        return x * self.g
'''

# The same class, defined in a script: Keras records its module as __main__.
SCRIPT_LAYER = REGISTERING_MODULE + r'''
inp = keras.Input((3,), name="x")
keras.Model(inp, Gain(name="gain")(inp)).save("script.keras")
'''


def test_custom_objects_flag_imports_modules_before_loading(tmp_path: Path) -> None:
    """A class registered in a script: the file names module __main__, which the CLI cannot
    import; a module registering the same name, passed with --custom-objects, makes it load."""
    (tmp_path / "make.py").write_text(SCRIPT_LAYER)
    (tmp_path / "demo_layers.py").write_text(REGISTERING_MODULE)
    run_python("make.py", cwd=tmp_path)
    res = run_cli("save", "script.keras", cwd=tmp_path)
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith("envlock: error:") and "Gain" in res.stderr
    assert not (tmp_path / "script.keras.envlock").exists()
    res = run_cli("save", "script.keras", "--custom-objects", "demo_layers", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    gain = json.loads(res.stdout)["custom_objects"][0]
    assert gain["module"] == "demo_layers" and gain["registered_name"] == "demo>Gain"
    assert gain["vendored"] == "code/demo_layers.py"


PREWARM_SCRIPT = r'''
import json
import keras, numpy as np
import envlock
import envlock.commands.reloader as es
import tinylayers

envlock.prewarm()
worker = es.RELOADER._idle[1]
inp = keras.Input((4,), name="features")
model = keras.Model(inp, tinylayers.Scale(name="scale")(inp))
first = envlock.save(model, "first.keras")
second = envlock.save(model, "second.keras")
print(json.dumps({"prewarmed": worker.pid, "kept": es.RELOADER._idle[1].pid,
                  "restored": [first.weights_restored, second.weights_restored]}))
'''


def test_prewarm_and_later_saves_reuse_one_reload_worker(tiny_project: Path, tmp_path: Path) -> None:
    """envlock.prewarm() starts the reload worker; the first save uses it, later ones too."""
    shutil.copy(tiny_project / "tinylayers.py", tmp_path / "tinylayers.py")
    (tmp_path / "prewarm.py").write_text(PREWARM_SCRIPT)
    proc = subprocess.run([sys.executable, "prewarm.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["prewarmed"] == doc["kept"] and doc["restored"] == [True, True]
    for name in ("first.keras", "second.keras"):
        assert manifest_of(tmp_path / name)["weights"]["restored"] is True


@pytest.mark.parametrize("setting", ["0", "1"])
def test_onednn_state_forced_both_ways(tiny_project: Path, tmp_path: Path, setting: str) -> None:
    """The effective oneDNN state is what TensorFlow ran with, not the CPU's default: forced off
    and on, the manifest says so (the variable as set, and the state TF reports)."""
    for f in tiny_project.iterdir():
        if f.is_file() and f.suffix in (".py", ".keras"):
            shutil.copy(f, tmp_path / f.name)
    res = run_cli("save", "model.keras", "--json", cwd=tmp_path, env={"TF_ENABLE_ONEDNN_OPTS": setting})
    assert res.returncode == 0, res.stderr
    d = manifest_of(tmp_path / "model.keras")["determinism"]
    assert d["onednn"] == {"env": setting, "effective": setting == "1"}
    assert d["env"]["TF_ENABLE_ONEDNN_OPTS"] == setting


# --- issue 10 section 1 and issue 12 item 8: what the weight fingerprint covers -------------------

SWAPLAYERS = '''
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="swap")
class TwoKernels(keras.layers.Layer):
    """Restores its two same-shaped kernels the wrong way round."""

    def build(self, input_shape):
        self.a = self.add_weight(shape=(4, 4), initializer="random_normal", name="a")
        self.b = self.add_weight(shape=(4, 4), initializer="random_normal", name="b")

    def call(self, x):
        return ops.matmul(ops.matmul(x, self.a), self.b)

    def load_own_variables(self, store):
        self.a.assign(store["1"])
        self.b.assign(store["0"])
'''


def test_same_shaped_variables_restored_swapped_fail_save(tmp_path: Path) -> None:
    (tmp_path / "swaplayers.py").write_text(SWAPLAYERS)
    (tmp_path / "train.py").write_text(
        "import keras, swaplayers\nkeras.utils.set_random_seed(0)\ninp = keras.Input((4,), name='x')\n"
        "keras.Model(inp, swaplayers.TwoKernels(name='two')(inp)).save('swapped.keras')\n")
    run_python("train.py", cwd=tmp_path)
    res = run_cli("save", "swapped.keras", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("envlock: error: weights_not_restored: weights of layer(s) two differ")
    assert lines[1].startswith("  hint: a custom layer (TwoKernels)")
    assert not (tmp_path / "swapped.keras.envlock").exists()


def test_stored_arrays_are_matched_layer_by_layer_in_order() -> None:
    from envlock.worker.payload.fingerprint import compare_with_stored

    def stored(*groups: tuple[str, list[str]]) -> list[dict[str, object]]:
        return [{"layer": g, "group": g, "index": i, "sha256": s}
                for g, shas in groups for i, s in enumerate(shas)]

    def loaded(*layers: tuple[str, list[str]]) -> dict[str, object]:
        return {"variables": [{"path": f"{name}/v{i}", "sha256": s, "kind": "variable"}
                              for name, shas in layers for i, s in enumerate(shas)]
                + [{"path": "lookup/vocabulary", "sha256": "voc", "kind": "vocabulary"}]}

    file = stored(("layers/dense", ["k1", "b1"]), ("layers/dense_1", ["k2", "b2"]))
    # Names may differ (another session's counters); order inside a layer may not.
    assert compare_with_stored(file, loaded(("d7", ["k1", "b1"]), ("d8", ["k2", "b2"]))) == []
    assert compare_with_stored(file, loaded(("d7", ["b1", "k1"]), ("d8", ["k2", "b2"]))) == ["d7"]
    assert compare_with_stored(file, loaded(("d7", ["k2", "b1"]), ("d8", ["k1", "b2"]))) == ["d7", "d8"]
    # An array of the file that no loaded layer took: named as the file names it.
    assert compare_with_stored(file, loaded(("d7", ["k1", "b1"]))) == ["layers/dense_1"]
    # A SavedModel checkpoint keeps no order: matched as a multiset.
    ckpt = [{"layer": "kernel", "group": "g", "index": None, "sha256": s} for s in ("k1", "b1")]
    assert compare_with_stored(ckpt, loaded(("d7", ["k1", "b1"]))) == []
    assert compare_with_stored(ckpt, loaded(("d7", ["k1", "x"]))) == ["d7"]


def test_string_arrays_hash_by_content_not_by_address() -> None:
    from envlock.worker.payload.fingerprint import array_sha256

    words = ["fixed", "normal", "reversible"]
    a = np.array([w for w in words], dtype=object)
    b = np.array([w.encode() for w in words], dtype=object)
    assert array_sha256(a) == array_sha256(np.array(words)) == array_sha256(b)
    assert array_sha256(a) != array_sha256(np.array(["fixed", "normal", "reversibl"], dtype=object))
    # Length-prefixed: moving a boundary between two items changes the hash.
    assert array_sha256(np.array(["ab", "c"])) != array_sha256(np.array(["a", "bc"]))


def test_errors_raised_through_the_api_carry_their_hint() -> None:
    from envlock.errors import WeightsNotRestoredError

    err = WeightsNotRestoredError(["dense"], detail="compared with the model in memory")
    assert err.message.startswith("weights_not_restored: weights of layer(s) dense differ")
    assert str(err) == f"{err.message}\n  hint: {err.hint}"
    assert "no custom layer" in str(err) and "build()" not in str(err)
    custom = WeightsNotRestoredError(["forgetful"], custom_layers=["ForgetfulDense"])
    assert "ForgetfulDense" in str(custom) and "build()" in str(custom)
