"""Sharded input, here and on a real Ray cluster (two nodes on this machine).

The cluster is ``ray.cluster_utils.Cluster`` started by a helper process in a venv holding
envlock[ray] and no TensorFlow, as a cluster's driver and nodes would: every actor builds the
locked environment in its node's own cache (each node has its own ENVLOCK_HOME) and starts
the usual worker there. Node "b" runs with TF_ENABLE_ONEDNN_OPTS=1, node "a" with 0: what a
node whose CPU turns oneDNN on looks like, for a model saved with it off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CliResult, envlock_host_venv, requires_tf, run_cli
from test_run import _one_error

pytestmark = [requires_tf, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray on Linux")]

UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
SHARDS, SHARD_ROWS = 8, 64  # whole multiples of Keras' batch of 32
CLUSTER = """\
import json, sys
from ray.cluster_utils import Cluster
nodes = json.loads(sys.argv[1])
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": nodes["a"]})
b = c.add_node(num_cpus=2, env_vars=nodes["b"])
c.wait_for_nodes()
print(json.dumps({"address": c.address, "a": c.head_node.node_id, "b": b.node_id}), flush=True)
sys.stdin.read()  # until the test closes it
c.shutdown()
"""
CONV_MODEL = """\
import sys
import keras
keras.utils.set_random_seed(0)
inp = keras.Input((16, 16, 8), name="image")
x = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inp)
x = keras.layers.Flatten(name="flat")(x)
keras.Model(inp, keras.layers.Dense(10, name="logits")(x)).save(sys.argv[1])
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ENVLOCK_CONFIG_DIR", str(Path(os.environ["ENVLOCK_HOME"]) / "config"))
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def _bits(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return str(a.dtype), a.shape, a.tobytes()


def _write_shards(folder: Path, x: np.ndarray, n: int) -> Path:
    folder.mkdir(parents=True)
    rows = len(x) // n
    for i in range(n):
        np.save(folder / f"part-{i:02d}.npy", x[i * rows:(i + 1) * rows])
    return folder


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def features(tmp_path_factory: pytest.TempPathFactory, saved_tiny: Path) -> tuple[Path, Path]:
    """512 rows, and their predictions by a single-machine `envlock run` over the one file."""
    d = tmp_path_factory.mktemp("ray-data")
    np.save(d / "x.npy", np.random.default_rng(3).standard_normal((SHARDS * SHARD_ROWS, 4)).astype("float32"))
    res = run_cli("run", str(saved_tiny), "--input", str(d / "x.npy"), "--output", str(d / "ref.npy"),
                  env=_env())
    assert res.returncode == 0, res.stderr
    return d / "x.npy", d / "ref.npy"


@pytest.fixture(scope="session")
def ray_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with envlock[ray] installed from this checkout, and no TensorFlow. Its bin/."""
    return envlock_host_venv(tmp_path_factory, "ray-host", "[ray]") / "bin"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, ray_host: Path) -> Iterator[dict[str, str]]:
    """Two Ray nodes, 2 CPUs each, each with its own envlock cache; node b with oneDNN forced on."""
    homes = tmp_path_factory.mktemp("ray-nodes")
    common = {"ENVLOCK_UV": str(UV), "ENVLOCK_CONFIG_DIR": _env()["ENVLOCK_CONFIG_DIR"],
              "TF_CPP_MIN_LOG_LEVEL": "2"}
    nodes = {name: {**common, "ENVLOCK_HOME": str(homes / name), "TF_ENABLE_ONEDNN_OPTS": onednn}
             for name, onednn in (("a", "0"), ("b", "1"))}
    env = _env()
    for k in ("RAY_ADDRESS", "TF_ENABLE_ONEDNN_OPTS"):
        env.pop(k, None)
    proc = subprocess.Popen([str(ray_host / "python"), "-c", CLUSTER, json.dumps(nodes)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=homes)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail("the Ray cluster did not start")
    info = {**json.loads(line), "home_a": nodes["a"]["ENVLOCK_HOME"], "home_b": nodes["b"]["ENVLOCK_HOME"],
            "pid": str(proc.pid)}
    yield info
    proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_an_unreachable_ray_address_exits_2_with_one_line(
        ray_host: Path, saved_tiny: Path, features: tuple[Path, Path], tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "a.npy", np.load(features[0])[:8])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    p = subprocess.run([str(ray_host / "envlock"), "run", str(saved_tiny), "--input", str(d), "--output",
                        str(tmp_path / "out"), "--ray", "127.0.0.1:9"], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "no Ray cluster reachable" in _one_error(p.stderr)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _ray_run(ray_host: Path, cluster: dict[str, str], *args: str, cwd: Path) -> CliResult:
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    p = subprocess.run([str(ray_host / "envlock"), "run", *args, "--ray", cluster["address"]], env=env,
                       cwd=cwd, capture_output=True, text=True, timeout=900)
    return CliResult(p.returncode, p.stdout, p.stderr)


def _envs(home: str) -> dict[str, list[str]]:
    root = Path(home) / "envs"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return {"complete": [n for n in names if not n.startswith(".") and (root / n).is_dir()],
            "leftovers": [n for n in names if n.startswith((".tmp-", ".trash-"))]}


# --- on this machine ------------------------------------------------------------------------------


@pytest.mark.slow
def test_shards_here_npy_npz_parquet_give_the_single_file_bits(
        saved_tiny: Path, features: tuple[Path, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x_path, ref_path = features
    x, ref = np.load(x_path), np.load(ref_path)
    shards = tmp_path / "in"
    shards.mkdir()
    np.save(shards / "a.npy", x[:64])
    np.savez(shards / "b.npz", features=x[64:128])
    pq.write_table(pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x[128:192])}),
                   shards / "c.parquet")
    pq.write_table(pa.table({"features": pa.array(list(x[192:256]), type=pa.list_(pa.float32())),
                             "id": np.arange(64)}), shards / "d.parquet")
    out = tmp_path / "out"
    res = run_cli("run", str(saved_tiny), "--input", str(shards), "--output", str(out), "--json", env=_env())
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "envlock.run.shards/1" and doc["ray"] is None and doc["rows"] == 256
    assert sorted(doc) == ["input", "lock_sha256", "model", "nodes", "output_dir", "ray", "rows", "schema",
                           "seconds", "shards"]
    assert sorted(doc["shards"][0]) == ["hostname", "input", "node_id", "output", "provenance", "rows",
                                        "seconds"]
    assert sorted(doc["nodes"][0]) == ["built", "cpu", "env_key", "gpus", "hostname", "lock_sha256",
                                       "machine", "node_id", "pid", "probe", "probe_max_abs_diff", "python",
                                       "strategy", "validated"]
    assert [Path(s["output"]).name for s in doc["shards"]] == ["a.npy", "b.npy", "c.npy", "d.npy"]
    got = np.concatenate([np.load(out / f"{s}.npy") for s in "abcd"])
    assert _bits(got) == _bits(ref[:256])
    (node,) = doc["nodes"]
    lock = (saved_tiny.parent / "model.keras.envlock" / "requirements.lock.txt").read_bytes()
    assert node["probe"] == "identical" and node["lock_sha256"] == hashlib.sha256(lock).hexdigest()
    prov = json.loads((out / "c.envlock.json").read_text())
    assert prov["schema"] == "envlock.shard/1" and prov["rows"] == 64 and prov["worker"] == node
    assert prov["input"].endswith("c.parquet") and prov["outputs"][0]["shape"] == [64, ref.shape[1]]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in "abcd" for suffix in (".npy", ".envlock.json"))


def _bad(case: str, tmp_path: Path, x: np.ndarray) -> tuple[list[str], str]:
    """(arguments after MODEL, words the error line must hold) for one bad input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    out = str(tmp_path / "out")
    if case == "empty_glob":
        return ["--input", str(d / "*.npy"), "--output", out], "no input shards"
    if case == "wrong_shape":
        np.save(d / "a.npy", np.zeros((8, 5), "float32"))
        return ["--input", str(d), "--output", out], "shape (8, 5)"
    if case == "wrong_dtype":
        np.save(d / "a.npy", np.array([["a"] * 4] * 8))
        return ["--input", str(d), "--output", out], "cannot be cast"
    if case == "mixed_dtypes":
        np.save(d / "a.npy", x[:8])
        np.save(d / "b.npy", x[:8].astype("float64"))
        return ["--input", str(d), "--output", out], "same dtypes"
    if case == "missing_column":
        pq.write_table(pa.table({"pixels": np.arange(8.0)}), d / "a.parquet")
        return ["--input", str(d), "--output", out], "no column for input(s) features"
    if case == "corrupt_parquet":
        (d / "a.parquet").write_bytes(b"PAR1 this is not a parquet file")
        return ["--input", str(d), "--output", out], "not a readable Parquet file"
    if case == "output_over_input":
        np.save(d / "a.npy", x[:8])
        return ["--input", str(d), "--output", str(d)], "would replace this input shard"
    if case == "ray_not_installed":
        np.save(d / "a.npy", x[:8])
        return ["--input", str(d), "--output", out, "--ray", "127.0.0.1:9"], "--ray needs Ray on this machine"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty_glob", "wrong_shape", "wrong_dtype", "mixed_dtypes",
                                  "missing_column", "corrupt_parquet", "output_over_input",
                                  "ray_not_installed"])
def test_bad_shards_exit_2_with_one_line_and_write_nothing(
        case: str, saved_tiny: Path, features: tuple[Path, Path], tmp_path: Path) -> None:
    """From the dev venv, which has no Ray (it stays out of every lock the tests write)."""
    if case == "ray_not_installed" and importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed in this interpreter")
    args, words = _bad(case, tmp_path, np.load(features[0]))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = run_cli("run", str(saved_tiny), *args, env=_env())
    assert res.returncode == 2, res.stderr
    assert words in _one_error(res.stderr)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- on a two-node Ray cluster --------------------------------------------------------------------


STATUS_DRIVER = """\
import json, sys
from pathlib import Path
from envlock.commands.raydriver import run_shards_on_ray

address, model, shards, out = sys.argv[1:5]
seen = []
result = run_shards_on_ray(model, shards, Path(out), address=address, actors=4,
                           on_status=lambda e: seen.append({"step": e["event"], **e}),
                           on_node=lambda f: seen.append({"step": "ready", **f}))
print(json.dumps({"seen": seen, "actors": list(result.nodes)}))
"""


@pytest.mark.slow
def test_each_node_says_what_it_does_while_it_prepares(
        ray_host: Path, cluster: dict[str, str], saved_tiny: Path, features: tuple[Path, Path],
        tmp_path: Path) -> None:
    """The status a person sees during the run: each actor says when it starts preparing its
    node's environment and when it builds it, then its verdict. Run first on fresh node caches:
    four actors start at once, one build per node."""
    fresh = not any(Path(cluster[h], "envs").exists() for h in ("home_a", "home_b"))
    shards = _write_shards(tmp_path / "in", np.load(features[0])[:128], 4)
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    p = subprocess.run([str(ray_host / "python"), "-c", STATUS_DRIVER, cluster["address"], str(saved_tiny),
                        str(shards), str(tmp_path / "out")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(doc["actors"]) == 4
    for actor in doc["actors"]:
        steps = [e["step"] for e in doc["seen"] if e["pid"] == actor["pid"]]
        assert steps[0] == "preparing" and steps[-1] == "ready", steps
        assert ("building" in steps) == actor["built"], steps  # said while it built, not after
    for node in ("a", "b"):
        mine = [a for a in doc["actors"] if a["node_id"] == cluster[node]]
        assert sum(a["built"] for a in mine) == (1 if fresh and mine else 0)


@pytest.mark.slow
def test_eight_shards_on_ray_from_a_host_without_tensorflow(
        ray_host: Path, cluster: dict[str, str], saved_tiny: Path, features: tuple[Path, Path],
        tmp_path: Path) -> None:
    probe = subprocess.run([str(ray_host / "python"), "-c", "import tensorflow"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert "ModuleNotFoundError" in probe.stderr
    fresh = not any(Path(cluster[h], "envs").exists() for h in ("home_a", "home_b"))
    x, ref = np.load(features[0]), np.load(features[1])
    shards = _write_shards(tmp_path / "in", x, SHARDS)
    out = tmp_path / "out"
    res = _ray_run(ray_host, cluster, str(saved_tiny), "--input", str(shards / "*.npy"), "--output", str(out),
                   "--actors", "4", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ray"] == {"address": cluster["address"]} and doc["rows"] == SHARDS * SHARD_ROWS
    got = np.concatenate([np.load(out / f"part-{i:02d}.npy") for i in range(SHARDS)])
    assert _bits(got) == _bits(ref)  # the same bits as one single-machine run over all rows

    # Four actors, two per node, each in its node's own cache: one build per node.
    actors = doc["nodes"]
    assert len(actors) == 4 and {a["node_id"] for a in actors} == {cluster["a"], cluster["b"]}
    for node in ("a", "b"):
        mine = [a for a in actors if a["node_id"] == cluster[node]]
        assert len(mine) == 2 and all(a["strategy"] == "venv" and a["probe"] == "identical" for a in mine)
        assert sum(a["built"] for a in mine) == (1 if fresh else 0)
        assert all(Path(a["python"]).is_relative_to(cluster[f"home_{node}"]) for a in mine)
        assert len(_envs(cluster[f"home_{node}"])["complete"]) == 1
        assert _envs(cluster[f"home_{node}"])["leftovers"] == []
    for s in doc["shards"]:
        prov = json.loads(Path(s["provenance"]).read_text())
        assert prov["worker"]["node_id"] == s["node_id"] in (cluster["a"], cluster["b"])
        assert prov["worker"]["probe"] == "identical" and prov["worker"]["lock_sha256"] == doc["lock_sha256"]


@pytest.fixture(scope="session")
def conv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 Conv2D (oneDNN changes its bits) saved with TF_ENABLE_ONEDNN_OPTS=0 recorded, and
    no tolerance: any other bit is a mismatch."""
    root = tmp_path_factory.mktemp("ray-conv")
    (root / "make_conv.py").write_text(CONV_MODEL)
    env = _env(TF_ENABLE_ONEDNN_OPTS="0")
    subprocess.run([sys.executable, "make_conv.py", "conv.keras"], cwd=root, env=env, check=True,
                   capture_output=True, timeout=600)
    res = run_cli("save", "conv.keras", "--atol", "0", "--rtol", "0", cwd=root, env=env)
    assert res.returncode == 0, res.stderr
    return root / "conv.keras"


@pytest.mark.slow
def test_a_node_with_onednn_on_is_refused_by_its_probe(
        ray_host: Path, cluster: dict[str, str], conv_model: Path, tmp_path: Path) -> None:
    """--no-recorded-env lets each node's own oneDNN setting reach its workers, as a node whose
    CPU turns oneDNN on by default would: node b's probe differs and it refuses, naming itself."""
    x = np.random.default_rng(5).standard_normal((4 * 32, 16, 16, 8)).astype("float32")
    shards = _write_shards(tmp_path / "in", x, 4)
    common = ["--input", str(shards), "--actors", "4", "--no-recorded-env"]
    refused = _ray_run(ray_host, cluster, str(conv_model), *common, "--output", str(tmp_path / "o1"),
                       cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr
    line = _one_error(refused.stderr)
    assert f"node {cluster['b']}" in line and "do not match the lock" in line and cluster["a"] not in line

    reported = _ray_run(ray_host, cluster, str(conv_model), *common, "--output", str(tmp_path / "o2"),
                        "--no-validate", "--json", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    doc = json.loads(reported.stdout)
    verdicts = {(a["node_id"], a["probe"]) for a in doc["nodes"]}
    assert verdicts == {(cluster["a"], "identical"), (cluster["b"], "mismatch")}
    for s in doc["shards"]:  # each shard says which verdict stood behind it
        worker = json.loads(Path(s["provenance"]).read_text())["worker"]
        assert worker["validated"] is False
        assert (worker["probe"] == "identical") == (worker["node_id"] == cluster["a"])


@pytest.mark.slow
def test_a_node_that_cannot_build_exits_3_naming_it(
        ray_host: Path, cluster: dict[str, str], saved_tiny: Path, features: tuple[Path, Path],
        tmp_path: Path) -> None:
    shards = _write_shards(tmp_path / "in", np.load(features[0])[:64], 2)
    res = _ray_run(ray_host, cluster, str(saved_tiny), "--input", str(shards), "--output",
                   str(tmp_path / "out"), "--strategy", "conda", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    line = _one_error(res.stderr)
    assert "conda-lock.yml" in line and any(f"node {cluster[n]}" in line for n in ("a", "b"))
    assert not (tmp_path / "out").exists()


API_DRIVER = """\
import json, sys
import numpy as np
import ray
import envlock.ray

address, model, x_path, out_path = sys.argv[1:5]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
x = np.load(x_path)
ds = ray.data.from_items([{"id": i, "features": row} for i, row in enumerate(x)])
preds = envlock.ray.predict(ds, model, concurrency=2, map_batch_size=64, provenance=True)
rows = sorted(preds.take_all(), key=lambda r: r["id"])
names = [k for k in rows[0] if k not in ("id", "envlock_provenance")]
np.save(out_path, np.stack([r[names[0]] for r in rows]))
print(json.dumps({"columns": sorted(rows[0]), "provenance": json.loads(rows[0]["envlock_provenance"])}))
"""


@pytest.mark.slow
def test_python_api_predict_maps_a_dataset_through_the_locked_worker(
        ray_host: Path, cluster: dict[str, str], saved_tiny: Path, features: tuple[Path, Path],
        tmp_path: Path) -> None:
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    p = subprocess.run([str(ray_host / "python"), "-c", API_DRIVER, cluster["address"], str(saved_tiny),
                        str(features[0]), str(tmp_path / "y.npy")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    manifest = json.loads((saved_tiny.parent / "model.keras.envlock" / "envlock.json").read_text())
    outputs = [o["name"] for o in manifest["model"]["outputs"]]
    assert doc["columns"] == sorted(["id", "envlock_provenance", *outputs])  # "features" was consumed
    assert doc["provenance"]["probe"] == "identical"
    assert doc["provenance"]["node_id"] in (cluster["a"], cluster["b"])
    # Rows batched by Ray, 64 at a time, predicted 32 at a time in the worker: the dense model's
    # rows do not depend on their neighbours, so the bits are the single-machine run's.
    assert _bits(np.load(tmp_path / "y.npy")) == _bits(np.load(features[1]))


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


@pytest.mark.slow
def test_actors_that_keep_dying_end_the_run_with_exit_4(
        ray_host: Path, cluster: dict[str, str], saved_tiny: Path, features: tuple[Path, Path],
        tmp_path: Path) -> None:
    """Every actor of the run SIGKILLed as soon as it appears: Ray restarts it a few times, then
    envlock says so in one line (exit 4) and leaves only complete shards."""
    shards = _write_shards(tmp_path / "in", np.load(features[0]), SHARDS)
    out = tmp_path / "out"
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    run = subprocess.Popen([str(ray_host / "envlock"), "run", str(saved_tiny), "--input", str(shards),
                            "--output", str(out), "--actors", "2", "--ray", cluster["address"]],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = 0
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:
        for pid in _descendants(int(cluster["pid"])):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ShardPredictor" in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.2)
    if run.poll() is None:
        run.kill()
        pytest.fail("envlock did not end while its actors kept dying")
    _, err = run.communicate()
    assert run.returncode == 4, err
    line = _one_error(err)
    assert "Ray" in line and killed >= 2
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    stems = {n.split(".")[0] for n in names}
    assert names == sorted(f"{s}{x}" for s in stems for x in (".npy", ".envlock.json"))
