"""What `envlock run` and `envlock env` cost over doing the same by hand (issue 3).

Measured in one run on this machine, each against a baseline measured in the same run:
    python bench/run.py [--repeat N] [--size-gb G] [--only warm|build|large] [--json PATH]
(`--size-gb 0.2 --pip-repeat 0` for a quick check: about two minutes instead of ten.)

(a) warm `envlock run --strategy venv` (environment already cached) against a plain script
    that loads the model with Keras and predicts in that same environment; end-to-end wall
    time of the command as a user sees it, Python start-up included. Target: at most 1.10x.
(b) a cold build (empty ENVLOCK_HOME; uv's own cache warm, as after one install) with
    `envlock env MODEL --strategy venv`, against `uv venv` + `uv pip sync --require-hashes`
    and against `python -m venv` + `pip install --require-hashes --no-deps -r` of the same
    requirements.lock.txt. Target: at most 1.15x uv.
(c) a large input (2 GB float32 .npy by default): prediction throughput of `envlock run`
    against an in-process `model.predict` on the same memory-mapped array in the same
    environment (target: at least 0.95x), and the peak memory of the envlock CLI process
    itself, not its worker (target: under 200 MB).

Prints a table and where envlock's time goes; never asserts (the machine is noisy). Every
command runs without PYTHONDONTWRITEBYTECODE (a user's default: byte code is cached), after
one untimed warm-up run of each side; the two sides alternate which goes first. Besides
medians it prints paired ratios and CPU seconds of each process tree, which other work on
a shared machine disturbs less than wall time (the load average is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
FEATURES = 512  # the quickstart model, wider: 2 GB of float32 is about 1M rows
SMALL_ROWS = 4096  # the input of the warm-run scenario
TARGETS = {"warm": 1.10, "build_uv": 1.15, "throughput": 0.95, "host_peak_mb": 200.0}

# The baseline of (a): what a user writes without envlock, run with the locked venv's python.
PLAIN = """\
import sys

import keras
import numpy as np

import layers  # noqa: F401  (registers the custom layer, as the user's own code would)

model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2], mmap_mode="r")
np.save(sys.argv[3], model.predict(x, batch_size=32, verbose=0))
"""

# The baseline of (c): in-process predict on the memory-mapped array, after a warm-up call
# (envlock's probe replay traces the predict function before the real input, too).
IN_PROCESS = """\
import json
import sys
import time

import keras
import numpy as np

import layers  # noqa: F401

model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2], mmap_mode="r")
model.predict(x[:32], batch_size=32, verbose=0)
t = time.perf_counter()
np.save(sys.argv[3], model.predict(x, batch_size=32, verbose=0))
print(json.dumps({"seconds": time.perf_counter() - t, "rows": int(x.shape[0])}))
"""

# The envlock CLI exactly as its console script runs it, reporting its own peak memory (the
# worker is a separate process; /usr/bin/time would fold the worker's peak into the CLI's).
HOST_PEAK = """\
import sys

from envlock.cli import main

rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
sys.stderr.write("envlock-bench host VmHWM_kB %s\\n" % peak)
sys.exit(rc)
"""


def make_model(work: Path) -> None:
    """Run in a child process (keeps TensorFlow out of the measuring process): train the
    quickstart model with a wider input and save it with envlock."""
    os.chdir(work)
    sys.path.insert(0, str(work))
    import keras
    import numpy as np
    from layers import Scale

    import envlock.commands.save

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SMALL_ROWS, FEATURES)).astype("float32")
    y = (x @ rng.standard_normal((FEATURES, 8)) / FEATURES**0.5).astype("float32")
    inp = keras.Input((FEATURES,), name="features")
    h = Scale(name="scale")(inp)
    h = keras.layers.Dense(128, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(8, name="prediction")(h))
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    envlock.commands.save.save(model, work / "model.keras", probe=x[:32])
    np.save(work / "small.npy", x)


# -- helpers ------------------------------------------------------------------------------------


def child_env(**extra: str | os.PathLike[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update({k: os.fspath(v) for k, v in extra.items()})
    return env


def envlock_cmd() -> list[str]:
    script = Path(sys.executable).parent / "envlock"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "envlock"]


CPU: list[float] = [0.0]  # CPU seconds (user + system) of the last command's process tree


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_cmd(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str], cwd: Path,
            what: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds and the result; CPU[0] gets the CPU seconds of the command and of every
    process it waited for (the worker included), which a busy neighbour disturbs less."""
    args = [os.fspath(a) for a in argv]
    cpu = _children_cpu()
    t = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    CPU[0] = _children_cpu() - cpu
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise SystemExit(f"bench: {what} failed (exit {done.returncode}): {' '.join(args)}\n{tail}")
    return seconds, done


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed_in_process(fn: Callable[[], Any], n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def same_bits(a: Path, b: Path) -> bool:
    import numpy as np

    return bool(np.array_equal(np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")))


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def say(text: str) -> None:
    print(text, flush=True)


# -- (a) warm run -------------------------------------------------------------------------------


def bench_warm(work: Path, config: Path, repeat: int) -> dict[str, Any]:
    model, small = work / "model.keras", work / "small.npy"
    env = child_env(ENVLOCK_HOME=work / "home-a", ENVLOCK_CONFIG_DIR=config)
    _, done = run_cmd([*envlock_cmd(), "env", model, "--strategy", "venv", "--json"], env=env, cwd=work,
                      what="building the environment for (a)")
    python = Path(json.loads(done.stdout)["python"])
    envlock_argv = [*envlock_cmd(), "run", model, "--input", small, "--output", work / "a-envlock.npy",
                    "--strategy", "venv", "--json"]
    plain_argv = [python, work / "plain.py", model, small, work / "a-plain.npy"]
    # Warm-up, untimed: the first import in a fresh venv writes its byte code (uv installs
    # without compiling), and the first run of each side warms the page cache.
    first_envlock, _ = run_cmd(envlock_argv, env=env, cwd=work, what="envlock run (warm-up)")
    run_cmd(plain_argv, env=env, cwd=work, what="the plain script (warm-up)")
    plain, runs = [], []
    plain_cpu, envlock_cpu = [], []
    for i in range(repeat):
        order = ("plain", "envlock") if i % 2 == 0 else ("envlock", "plain")
        for side in order:
            if side == "plain":
                plain.append(run_cmd(plain_argv, env=env, cwd=work, what="the plain script")[0])
                plain_cpu.append(CPU[0])
            else:
                secs, done = run_cmd(envlock_argv, env=env, cwd=work, what="envlock run")
                runs.append((secs, json.loads(done.stdout)["seconds"]))
                envlock_cpu.append(CPU[0])
    wall = [s for s, _ in runs]
    phases = {k: median([d.get(k, 0.0) for _, d in runs]) for k in runs[0][1]}
    return {
        "python": str(python), "plain": plain, "envlock": wall, "plain_median": median(plain),
        "envlock_median": median(wall), "ratio": median(wall) / median(plain),
        # Less sensitive to a neighbour's load than the ratio of medians: each envlock run
        # against the plain run next to it in time, and the best of each side.
        "paired_ratio_median": median([e / b for e, b in zip(wall, plain)]),
        "best_ratio": min(wall) / min(plain),
        "plain_cpu": plain_cpu, "envlock_cpu": envlock_cpu,
        "cpu_ratio": median(envlock_cpu) / median(plain_cpu),
        "first_envlock_run": first_envlock, "phases": phases,
        "same_bits": same_bits(work / "a-envlock.npy", work / "a-plain.npy"),
        # Per run: wall time minus the phases that run reported, then the median.
        "outside_phases": median([s - sum(d.values()) for s, d in runs]),
        "breakdown": breakdown_warm(work, env),
    }


def breakdown_warm(work: Path, env: dict[str, str]) -> dict[str, float]:
    """Where a warm run's time goes outside the phases `envlock run --json` reports."""
    from envlock.commands.run import ModelSession
    from envlock.settings import Settings
    from envlock.sidecar.arrays import check_input_file
    from envlock.sidecar.store import read_sidecar

    model = work / "model.keras"

    def start(code: str) -> float:
        return median([run_cmd([sys.executable, "-c", code], env=env, cwd=work, what="python -c")[0]
                       for _ in range(5)])

    bare = start("pass")
    # What `envlock run` imports before it starts the worker (numpy: the input header check).
    imports = start("import envlock.cli, envlock.commands.run, envlock.sidecar.arrays, rich.progress") - bare
    settings = Settings.from_env(env)
    sidecar = timed_in_process(lambda: read_sidecar(model))
    specs = read_sidecar(model).manifest["model"]["inputs"]
    check_input = timed_in_process(lambda: check_input_file(work / "small.npy", specs))
    closes = []
    for _ in range(2):
        with ModelSession(model, settings=settings, strategy="venv") as session:
            session.validate()
            session.predict_file(work / "small.npy", work / "a-breakdown.npy")
            t = time.perf_counter()
            session.close()
            closes.append(time.perf_counter() - t)
    return {"python_start": bare, "host_imports": imports, "read_sidecar": sidecar,
            "check_input_file": check_input, "worker_exit": median(closes)}


# -- (b) cold build -----------------------------------------------------------------------------


def bench_build(work: Path, config: Path, repeat: int, pip_repeat: int) -> dict[str, Any]:
    from envlock.envs.interpreters import find_python
    from envlock.settings import Settings
    from envlock.sidecar.store import read_sidecar
    from envlock.tools.uv import find_uv

    model = work / "model.keras"
    sc = read_sidecar(model)
    lock = sc.file("requirements.lock.txt")
    settings = Settings.from_env(child_env(ENVLOCK_HOME=work / "home-b", ENVLOCK_CONFIG_DIR=config))
    base = find_python(str(sc.manifest["python"]["version"]), settings=settings).path
    uv = find_uv(settings.uv_path)
    user_env = child_env()
    envlock_times, uv_times, pip_times = [], [], []
    cpu: dict[str, list[float]] = {"envlock": [], "uv": [], "pip": []}

    def envlock_build(i: int) -> float:
        home = work / f"home-b{i}"
        env = child_env(ENVLOCK_HOME=home, ENVLOCK_CONFIG_DIR=config)
        secs, done = run_cmd([*envlock_cmd(), "env", model, "--strategy", "venv", "--json"], env=env,
                             cwd=work, what="envlock env (cold)")
        cpu["envlock"].append(CPU[0])
        if not json.loads(done.stdout)["built"]:
            raise SystemExit("bench: envlock env found an environment in an empty ENVLOCK_HOME")
        shutil.rmtree(home, ignore_errors=True)
        return secs

    def uv_build(i: int) -> float:
        venv = work / f"uv-{i}"
        a, _ = run_cmd([uv, "venv", "-q", "--python", base, venv], env=user_env, cwd=work, what="uv venv")
        a_cpu = CPU[0]
        b, _ = run_cmd([uv, "pip", "sync", "-q", "--require-hashes", "--python", venv / "bin" / "python",
                        lock], env=user_env, cwd=work, what="uv pip sync")
        cpu["uv"].append(a_cpu + CPU[0])
        shutil.rmtree(venv, ignore_errors=True)
        return a + b

    def pip_build(i: int) -> float:
        venv = work / f"pip-{i}"
        a, _ = run_cmd([base, "-m", "venv", venv], env=user_env, cwd=work, what="python -m venv")
        a_cpu = CPU[0]
        b, _ = run_cmd([venv / "bin" / "python", "-m", "pip", "install", "-q", "--require-hashes",
                        "--no-deps", "-r", lock], env=user_env, cwd=work, what="pip install")
        cpu["pip"].append(a_cpu + CPU[0])
        shutil.rmtree(venv, ignore_errors=True)
        return a + b

    envlock_build(-1)  # warm-up, untimed: uv's cache and the page cache as after one install
    uv_build(-1)
    cpu["envlock"].clear()
    cpu["uv"].clear()
    for i in range(repeat):
        sides = [(envlock_build, envlock_times), (uv_build, uv_times)]
        for fn, sink in sides if i % 2 == 0 else sides[::-1]:
            sink.append(fn(i))
    for i in range(pip_repeat):
        say(f"  pip build {i + 1}/{pip_repeat} (slow)...")
        pip_times.append(pip_build(i))
    e, u = median(envlock_times), median(uv_times)
    return {
        "base_python": str(base), "uv": str(uv), "envlock": envlock_times, "uv_times": uv_times,
        "pip_times": pip_times, "envlock_median": e, "uv_median": u, "pip_median": median(pip_times),
        "ratio_uv": e / u, "ratio_pip": e / median(pip_times) if pip_times else float("nan"),
        "paired_ratio_uv_median": median([a / b for a, b in zip(envlock_times, uv_times)]),
        "cpu": cpu,
        "breakdown": breakdown_build(work, settings, sc, base, uv),
    }


def breakdown_build(work: Path, settings: Any, sc: Any, base: Path, uv: Path) -> dict[str, float]:
    """The parts of a cold `envlock env` that uv's own two commands do not have."""
    from envlock.envs.cache import EnvSpec, _tree_size, default_platform_tag
    from envlock.envs.interpreters import find_python
    from envlock.sidecar.store import read_sidecar
    from envlock.tools import uv as uv_tool

    lock = sc.file("requirements.lock.txt")
    version = str(sc.manifest["python"]["version"])
    venv = work / "uv-size"
    run_cmd([uv, "venv", "-q", "--python", base, venv], env=child_env(), cwd=work, what="uv venv")
    run_cmd([uv, "pip", "sync", "-q", "--require-hashes", "--python", venv / "bin" / "python", lock],
            env=child_env(), cwd=work, what="uv pip sync")
    out = {
        "read_sidecar": timed_in_process(lambda: read_sidecar(sc.path)),
        "lock_key": timed_in_process(lambda: EnvSpec.from_lock(lock, version,
                                                               platform_tag=default_platform_tag())),
        "find_uv_and_version_x2": timed_in_process(
            lambda: [uv_tool.version(uv_tool.find_uv(settings.uv_path)) for _ in range(2)]),
        "find_python": timed_in_process(lambda: find_python(version, settings=settings)),
        "tree_size_walk": timed_in_process(lambda: _tree_size(venv), n=1),
    }
    shutil.rmtree(venv, ignore_errors=True)
    return out


# -- (c) a large input --------------------------------------------------------------------------


def write_large(path: Path, rows: int) -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    step = 1 << 16
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        mm[start:stop] = rng.standard_normal((stop - start, FEATURES), dtype=np.float32)
    mm.flush()
    del mm


def bench_large(work: Path, config: Path, python: Path, size_gb: float) -> dict[str, Any]:
    model = work / "model.keras"
    rows = max(1024, int(size_gb * 1e9) // (FEATURES * 4))
    big = work / "large.npy"
    say(f"  writing {big.name}: {rows} rows x {FEATURES} float32 ({rows * FEATURES * 4 / 1e9:.2f} GB)...")
    write_large(big, rows)
    nbytes = rows * FEATURES * 4
    env = child_env(ENVLOCK_HOME=work / "home-a", ENVLOCK_CONFIG_DIR=config)
    try:
        say("  in-process model.predict...")
        base_wall, done = run_cmd([python, work / "in_process.py", model, big, work / "c-base.npy"],
                                  env=env, cwd=work, what="in-process predict")
        base = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        say("  envlock run...")
        wall, done = run_cmd([sys.executable, "-c", HOST_PEAK, "run", model, "--input", big, "--output",
                              work / "c-envlock.npy", "--strategy", "venv", "--json"], env=env, cwd=work,
                             what="envlock run (large input)")
        result = json.loads(done.stdout)
        peak_kb = next(int(line.split()[-1]) for line in done.stderr.splitlines()
                       if line.startswith("envlock-bench host VmHWM_kB"))
        same = same_bits(work / "c-base.npy", work / "c-envlock.npy")
    finally:
        for p in (big, work / "c-base.npy", work / "c-envlock.npy"):
            p.unlink(missing_ok=True)
    predict = result["seconds"]["predict"]
    return {
        "rows": rows, "bytes": nbytes, "baseline_predict": base, "baseline_wall": base_wall,
        "envlock_predict": predict, "envlock_wall": wall, "envlock_phases": result["seconds"],
        "baseline_rows_per_s": rows / base, "envlock_rows_per_s": rows / predict,
        "baseline_mb_per_s": nbytes / base / 1e6, "envlock_mb_per_s": nbytes / predict / 1e6,
        "throughput_ratio": base / predict, "host_peak_mb": peak_kb / 1024, "same_bits": same,
    }


# -- report -------------------------------------------------------------------------------------


def report(res: dict[str, Any]) -> None:
    rows: list[tuple[str, float, float, str, str, bool | None]] = []
    if "warm" in res:
        w = res["warm"]
        rows.append((f"(a) warm run, median of {len(w['envlock'])}", w["plain_median"], w["envlock_median"],
                     f"{w['ratio']:.2f}x", f"<= {TARGETS['warm']:.2f}x", w["ratio"] <= TARGETS["warm"]))
    if "build" in res:
        b = res["build"]
        rows.append((f"(b) cold build vs uv, median of {len(b['envlock'])}", b["uv_median"],
                     b["envlock_median"], f"{b['ratio_uv']:.2f}x", f"<= {TARGETS['build_uv']:.2f}x",
                     b["ratio_uv"] <= TARGETS["build_uv"]))
        if b["pip_times"]:
            rows.append((f"(b) cold build vs venv + pip, n={len(b['pip_times'])}", b["pip_median"],
                         b["envlock_median"], f"{b['ratio_pip']:.2f}x", "-", None))
    if "large" in res:
        c = res["large"]
        gb = c["bytes"] / 1e9
        rows.append((f"(c) {gb:.2f} GB predict, throughput", c["baseline_predict"], c["envlock_predict"],
                     f"{c['throughput_ratio']:.2f}x", f">= {TARGETS['throughput']:.2f}x",
                     c["throughput_ratio"] >= TARGETS["throughput"]))
        rows.append((f"(c) {gb:.2f} GB, end to end (start-up included)", c["baseline_wall"],
                     c["envlock_wall"], f"{c['envlock_wall'] / c['baseline_wall']:.2f}x", "-", None))
    say("")
    say(f"{'scenario':44} {'baseline s':>10} {'envlock s':>10} {'ratio':>7} {'target':>9}  result")
    for name, base, env, ratio, target, met in rows:
        verdict = "-" if met is None else ("met" if met else "NOT met")
        say(f"{name:44} {base:10.3f} {env:10.3f} {ratio:>7} {target:>9}  {verdict}")
    if "large" in res:
        c = res["large"]
        ok = c["host_peak_mb"] < TARGETS["host_peak_mb"]
        say(f"{'(c) host (CLI process) peak memory, MB':44} {'':>10} {c['host_peak_mb']:10.1f} {'':>7} "
            f"{'< 200 MB':>9}  {'met' if ok else 'NOT met'}")
    say("ratio: envlock s / baseline s; on the throughput row baseline s / envlock s (higher is better)")
    say(f"load average: {res['machine']['load_before']} before, {res['machine']['load_after']} after "
        f"({res['machine']['cpus']} CPUs; other work on the machine shows up as noise)")

    if "warm" in res:
        w = res["warm"]
        say("\n(a) where a warm `envlock run` goes (medians, seconds):")
        say(f"  plain script runs:   {' '.join(f'{s:.2f}' for s in w['plain'])}")
        say(f"  envlock runs:        {' '.join(f'{s:.2f}' for s in w['envlock'])}"
            f"   (first run after the build, untimed: {w['first_envlock_run']:.2f})")
        say(f"  ratio of medians {w['ratio']:.2f}x; median of paired ratios {w['paired_ratio_median']:.2f}x; "
            f"best against best {w['best_ratio']:.2f}x")
        say(f"  CPU seconds (process tree, medians): plain {median(w['plain_cpu']):.2f}, envlock "
            f"{median(w['envlock_cpu']):.2f} ({w['cpu_ratio']:.2f}x)")
        say(f"  phases (--json):     {json.dumps({k: round(v, 3) for k, v in w['phases'].items()})}")
        bd = w["breakdown"]
        say(f"  outside the phases:  {w['outside_phases']:.3f} s of the wall time; measured apart: "
            f"python start-up {bd['python_start']:.3f}, host imports {bd['host_imports']:.3f}, "
            f"sidecar read+verify {bd['read_sidecar']:.3f}, input header check "
            f"{bd['check_input_file']:.3f}, worker exit (waited for by close) {bd['worker_exit']:.3f}")
        say(f"  outputs bitwise equal to the plain script's: {w['same_bits']}")
    if "build" in res:
        b = res["build"]
        say("\n(b) cold build (seconds):")
        say(f"  envlock env: {' '.join(f'{s:.2f}' for s in b['envlock'])}")
        say(f"  uv venv + uv pip sync: {' '.join(f'{s:.2f}' for s in b['uv_times'])}")
        cpu = {k: median(v) for k, v in b["cpu"].items() if v}
        say(f"  median of paired ratios (envlock / uv): {b['paired_ratio_uv_median']:.2f}x; CPU seconds "
            f"(process tree, medians): {', '.join(f'{k} {v:.2f}' for k, v in cpu.items())}")
        if b["pip_times"]:
            say(f"  python -m venv + pip install: {' '.join(f'{s:.2f}' for s in b['pip_times'])} "
                "(pip's own cache and configuration as they are on this machine)")
        say(f"  envlock-only steps: {json.dumps({k: round(v, 3) for k, v in b['breakdown'].items()})}")
    if "large" in res:
        c = res["large"]
        say(f"\n(c) {c['rows']} rows, {c['bytes'] / 1e9:.2f} GB:")
        say(f"  in-process predict: {c['baseline_rows_per_s']:.0f} rows/s, {c['baseline_mb_per_s']:.1f} MB/s")
        say(f"  envlock run:        {c['envlock_rows_per_s']:.0f} rows/s, {c['envlock_mb_per_s']:.1f} MB/s "
            f"(predict phase; phases {json.dumps({k: round(v, 2) for k, v in c['envlock_phases'].items()})})")
        say(f"  outputs bitwise equal: {c['same_bits']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="repeats of (a) and of (b) (medians)")
    ap.add_argument("--pip-repeat", type=int, default=1, help="repeats of the pip build (slow)")
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the input of (c)")
    ap.add_argument("--only", choices=["warm", "build", "large"], action="append",
                    help="run only these scenarios (repeatable)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return 0
    only = set(args.only or ("warm", "build", "large"))

    work = Path(tempfile.mkdtemp(prefix="envlock-bench-run-"))
    config = work / "config"  # shared trust list: the sidecar saved here is trusted in every home
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "load_before": _load()}}
    try:
        shutil.copy(QUICKSTART / "layers.py", work / "layers.py")
        (work / "plain.py").write_text(PLAIN)
        (work / "in_process.py").write_text(IN_PROCESS)
        say(f"bench: work folder {work}; training and saving the model...")
        run_cmd([sys.executable, __file__, "--make-model", work],
                env=child_env(ENVLOCK_HOME=work / "home-save", ENVLOCK_CONFIG_DIR=config), cwd=work,
                what="making the model")
        if "warm" in only or "large" in only:
            say(f"(a) warm run: {args.repeat} repeats of each side...")
            results["warm"] = bench_warm(work, config, args.repeat)
        if "build" in only:
            say(f"(b) cold build: {args.repeat} repeats of envlock and uv, {args.pip_repeat} of pip...")
            results["build"] = bench_build(work, config, args.repeat, args.pip_repeat)
        if "large" in only:
            say(f"(c) large input, {args.size_gb:g} GB...")
            results["large"] = bench_large(work, config, Path(results["warm"]["python"]), args.size_gb)
        results["machine"]["load_after"] = _load()
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
