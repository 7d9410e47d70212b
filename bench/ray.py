"""`envlock run --ray` against plain Ray Data and against single-machine `envlock run` (issue 14).

    python bench/ray.py [--shards 16] [--rows 20000] [--repeat 2] [--json PATH]

One local Ray instance (2 CPUs by default) is started by this script and shared by both Ray
sides, so neither pays Ray's start-up. Over the same shards (float32 .npy, a 256-512-256-10
MLP saved with envlock in this interpreter's environment):

(a) `envlock run MODEL --input SHARDS --output DIR --ray ADDRESS`: an actor per CPU, each with
    the envlock worker in the locked environment (here: this interpreter, which satisfies the
    lock), the probe replayed per actor, whole shards, outputs written on the driver.
(b) plain Ray Data in the same environment: `read_numpy(shards).map_batches(TFPredictor)` on
    an actor pool of the same size, TFPredictor loading the model with Keras and calling
    `model.predict(batch, batch_size=32)`, `write_numpy` of the predictions. Target: (a) at
    least 0.9x the rows/s of (b).
(c) single-machine `envlock run MODEL --input X.npy` over the same rows in one file.

Wall time of each command end to end (Python start-up, actor start, model load included),
each run once untimed first, then alternating. Prints the load average: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and this file is named ray.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
FEATURES = 256
TARGET = 0.9

MAKE_MODEL = """\
import sys
import keras
keras.utils.set_random_seed(0)
inp = keras.Input((FEATURES,), name="features")
x = keras.layers.Dense(512, activation="relu")(inp)
x = keras.layers.Dense(256, activation="relu")(x)
keras.Model(inp, keras.layers.Dense(10, name="logits")(x)).save(sys.argv[1])
""".replace("FEATURES", str(FEATURES))

PLAIN_RAY = """\
import sys
import numpy as np
import ray

address, model_path, shards, out, actors = sys.argv[1:6]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False


class TFPredictor:
    def __init__(self, path):
        import keras
        self.model = keras.saving.load_model(path)

    def __call__(self, batch):
        return {"pred": self.model.predict(batch["data"], batch_size=32, verbose=0)}


paths = sorted(str(p) for p in __import__("pathlib").Path(shards).glob("*.npy"))
ds = ray.data.read_numpy(paths, override_num_blocks=len(paths))
ds = ds.map_batches(TFPredictor, fn_constructor_args=(model_path,), batch_size=None, num_cpus=1,
                    compute=ray.data.ActorPoolStrategy(size=int(actors)))
ds.write_numpy(out, column="pred")
"""


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(argv)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rows", type=int, default=20000, help="rows per shard")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (= actors)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np
    import ray

    work = Path(tempfile.mkdtemp(prefix="envlock-bench-ray-"))
    env = dict(os.environ, ENVLOCK_HOME=str(work / "home"), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RAY_ADDRESS", None)
    py = sys.executable
    try:
        print(f"load average at start: {loadavg()}", flush=True)
        model = work / "mlp.keras"
        subprocess.run([py, "-c", MAKE_MODEL, str(model)], env=env, check=True, capture_output=True)
        subprocess.run([py, "-m", "envlock", "save", str(model)], env=env, check=True, capture_output=True)
        shards = work / "shards"
        shards.mkdir()
        rng = np.random.default_rng(0)
        parts = [rng.standard_normal((args.rows, FEATURES)).astype("float32") for _ in range(args.shards)]
        for i, part in enumerate(parts):
            np.save(shards / f"part-{i:03d}.npy", part)
        np.save(work / "all.npy", np.concatenate(parts))
        del parts
        rows = args.shards * args.rows

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        address = ray.get_runtime_context().gcs_address
        # ray.init put the instance's auth token (RAY_AUTH_*) into os.environ: drivers need it.
        env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_") and k != "RAY_ADDRESS"})
        sides = {
            "envlock_ray": lambda out: [py, "-m", "envlock", "run", str(model), "--input", str(shards),
                                        "--output", str(out), "--actors", str(args.cpus), "--quiet",
                                        "--ray", address],
            "plain_ray": lambda out: [py, "-c", PLAIN_RAY, address, str(model), str(shards), str(out),
                                      str(args.cpus)],
            "envlock_single": lambda out: [py, "-m", "envlock", "run", str(model), "--input",
                                           str(work / "all.npy"), "--output", str(out) + ".npy", "--quiet"],
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.repeat + 1):  # round 0: untimed warm-up of each side
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                out = work / f"out-{name}-{r}"
                seconds = timed(sides[name](out), env)
                shutil.rmtree(out, ignore_errors=True)
                Path(str(out) + ".npy").unlink(missing_ok=True)
                if r > 0:
                    times[name].append(seconds)
                print(f"  round {r} {name:15s} {seconds:7.2f} s   (load {loadavg()})", flush=True)
        ray.shutdown()

        # The two sides give the same bits per shard: the ratio compares equal work.
        same = _same_bits(py, env, model, shards, work=work)
        med = {k: statistics.median(v) for k, v in times.items()}
        rps = {k: rows / v for k, v in med.items()}
        result: dict[str, Any] = {
            "rows": rows, "shards": args.shards, "cpus": args.cpus, "median_seconds": med,
            "rows_per_second": rps, "envlock_ray_vs_plain_ray": rps["envlock_ray"] / rps["plain_ray"],
            "envlock_ray_vs_single": rps["envlock_ray"] / rps["envlock_single"], "target": TARGET,
            "bitwise_equal_to_single": same, "load_average_at_end": os.getloadavg()}
        print(f"\n{rows} rows in {args.shards} shards, {args.cpus} actors, medians of {args.repeat}:")
        for k in sides:
            print(f"  {k:15s} {med[k]:7.2f} s  {rps[k]:10.0f} rows/s")
        ratio = result["envlock_ray_vs_plain_ray"]
        print(f"  envlock --ray / plain Ray Data: {ratio:.2f}x (target >= {TARGET})")
        print(f"  envlock --ray / single-machine envlock run: {result['envlock_ray_vs_single']:.2f}x")
        print(f"  envlock --ray outputs bitwise equal to the single-machine run: {same}")
        print(f"load average at end: {loadavg()}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _same_bits(py: str, env: dict[str, str], model: Path, shards: Path, *,
               work: Path) -> bool:
    """One more pair of runs, kept: `envlock run --ray` (a local instance) against the single file."""
    import numpy as np

    out_ray, out_one = work / "check-ray", work / "check-one.npy"
    subprocess.run([py, "-m", "envlock", "run", str(model), "--input", str(shards), "--output", str(out_ray),
                    "--quiet", "--ray"], env=env, check=True, capture_output=True)
    subprocess.run([py, "-m", "envlock", "run", str(model), "--input", str(work / "all.npy"), "--output",
                    str(out_one), "--quiet"], env=env, check=True, capture_output=True)
    got = np.concatenate([np.load(p) for p in sorted(out_ray.glob("*.npy"))])
    return bool(got.tobytes() == np.load(out_one).tobytes())


if __name__ == "__main__":
    sys.exit(main())
