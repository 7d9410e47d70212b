"""What `envlock save` adds over Keras' own `model.save`, cold and warm hash cache.

Measured in one run on this machine, against a baseline measured in the same run:
    ./dev bench save            (or: python bench/save.py [--repeat N])
Prints seconds and ratios; never asserts (the machine is noisy). Targets (issue 2): at most
2 s added with a cold hash cache for a TensorFlow environment, at most 0.5 s warm.

Three cases, because they cost different things: the first save in a process starts the
reload worker (a fresh interpreter importing TensorFlow, which the fingerprint of the model
*as loaded back* needs); later saves in the same process reuse that worker, with a cold or a
warm package-index cache. The first case is measured in a fresh subprocess each time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "quickstart"))


def build_model():  # type: ignore[no-untyped-def]
    import keras
    from layers import Scale  # the example's custom layer

    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="features")
    h = Scale(name="scale")(inp)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="prediction")(h))


_FIRST = """
import os, sys, time
sys.path[:0] = [{bench!r}, {example!r}]
import save as bench
from envlock.commands.save import prewarm, save
from envlock.settings import Settings
if {prewarm!r}:
    prewarm(settings=Settings.from_env({{**os.environ, "ENVLOCK_HOME": {home!r}}}))
    time.sleep(3)  # stands in for training, which takes longer than TensorFlow's import
model = bench.build_model()
model.save({warm!r})
settings = Settings.from_env({{**os.environ, "ENVLOCK_HOME": {home!r}}})
t = time.perf_counter()
save(model, {target!r}, settings=settings)
print(time.perf_counter() - t)
"""


def _first_save_in_fresh_process(work: Path, i: int, *, prewarm: bool = False) -> float:
    """envlock.save as the first save of a fresh process, with an empty hash cache; with
    ``prewarm``, after envlock.prewarm() at the top of the script."""
    import subprocess

    here = Path(__file__).resolve().parent
    code = _FIRST.format(bench=str(here), example=str(here.parent / "examples" / "quickstart"),
                         warm=str(work / f"first-warm{i}-{prewarm}.keras"),
                         home=str(work / f"first-home{i}-{prewarm}"),
                         target=str(work / f"first{i}-{prewarm}.keras"), prewarm=prewarm)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -- a big model: save's cost against what loading it costs (issue 10, section 9) ------------------

_BUILD_BIG = """
import os, sys
import keras, numpy as np
units = {units}
keras.utils.set_random_seed(0)
inp = keras.Input((units,), name="features")
h = keras.layers.Dense(units // 2, name="dense_a")(inp)
model = keras.Model(inp, keras.layers.Dense(units, name="dense_b")(h))
model.save({path!r})
"""

# The floor: what any reproducibility check must pay at least, in a fresh process: load the
# file, and hash every weight.
_FLOOR = """
import hashlib, sys
import keras, numpy as np
model = keras.models.load_model(sys.argv[1], compile=False)
for w in model.weights:
    hashlib.sha256(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).data).hexdigest()
"""

# The API case: a training process holding the model, prewarm() at its top; training is a
# sleep long enough for the reload worker to import TensorFlow. Prints the seconds of the part
# measured, after a line "go" that tells the sampler when to start counting.
_API = """
import os, subprocess, sys, time
import keras
{prewarm}
model = keras.models.load_model({src!r}, compile=False)  # "trained" weights
time.sleep({sleep})
print("go", flush=True)
t = time.perf_counter()
{body}
print(time.perf_counter() - t, flush=True)
"""
_API_ENVLOCK = "envlock.save(model, {dst!r})"
_API_BASELINE = ("model.save({dst!r})\n"
                 "subprocess.run([sys.executable, '-c', {floor!r}, {dst!r}], check=True)")


def _tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (TensorFlow's libraries, mapped by every process of
    the tree) are counted once over the tree, not once per process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _measured(argv: list[str], *, cwd: Path, env: dict[str, str], wait_for_go: bool = False
              ) -> tuple[float, float, str]:
    """(seconds, peak MB of the whole process tree, stdout) of one command. With
    ``wait_for_go``, both count from the moment the command prints "go" (the part before it
    is set-up: building the model in memory); seconds are what the command itself prints last."""
    import subprocess
    import threading

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]
    counting = threading.Event()
    if not wait_for_go:
        counting.set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if counting.is_set():
                peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree(proc.pid)))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[str] = []
    t = time.perf_counter()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "go":
            counting.set()
    err = proc.stderr.read() if proc.stderr is not None else ""
    proc.wait()
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed (exit {proc.returncode}):\n{err[-3000:]}")
    if wait_for_go:
        seconds = float(lines[-1])
    return seconds, peak[0] / 1024, "".join(lines)


def big_model(size_mb: float, repeat: int, json_out: Path | None) -> int:
    """`envlock save` of a model of ``size_mb`` (two Dense layers) against the floor, and
    envlock.save after prewarm() against model.save plus the floor, all measured in this run."""
    units = max(8, round((size_mb * 1e6 / 4) ** 0.5))  # two kernels of units * units/2 floats
    work = Path(tempfile.mkdtemp(prefix="envlock-bench-big-"))
    env = dict(os.environ)
    env["ENVLOCK_HOME"] = str(work / "home")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    py = sys.executable
    try:
        src = work / "big.keras"
        import subprocess

        subprocess.run([py, "-c", _BUILD_BIG.format(units=units, path=str(src))], check=True, env=env)
        mb = src.stat().st_size / 1e6
        # Warm the index cache and the page cache once: every case then starts alike.
        subprocess.run([py, "-m", "envlock", "save", str(src), "--quiet"], check=True, env=env, cwd=work)
        shutil.rmtree(work / "big.keras.envlock")
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("floor", "cli", "base", "api")}
        for i in range(repeat):
            rows["floor"].append(_measured([py, "-c", _FLOOR, str(src)], cwd=work, env=env)[:2])
            copy = work / f"cli{i}.keras"
            shutil.copyfile(src, copy)
            rows["cli"].append(_measured([py, "-m", "envlock", "save", str(copy), "--quiet"], cwd=work,
                                         env=env)[:2])
            base = _API.format(prewarm="", src=str(src), sleep=0,
                               body=_API_BASELINE.format(dst=str(work / f"base{i}.keras"), floor=_FLOOR))
            rows["base"].append(_measured([py, "-c", base], cwd=work, env=env, wait_for_go=True)[:2])
            api = _API.format(prewarm="import envlock\nenvlock.prewarm()", src=str(src), sleep=8,
                              body=_API_ENVLOCK.format(dst=str(work / f"api{i}.keras")))
            rows["api"].append(_measured([py, "-c", api], cwd=work, env=env, wait_for_go=True)[:2])
        med = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v))
               for k, v in rows.items()}
        load = os.getloadavg()
        print(f"model: {mb:.0f} MB file, two Dense layers ({units} -> {units // 2} -> {units}); "
              f"median of {repeat}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"on {os.cpu_count()} CPUs")
        print(f"{'':46} {'seconds':>8} {'peak MB':>8} {'time':>7} {'memory':>7}")
        for key, label, ref in (("floor", "floor: fresh load_model + sha256 of weights", "floor"),
                                ("cli", "envlock save MODEL", "floor"),
                                ("base", "model.save + floor", "base"),
                                ("api", "envlock.save(model) after prewarm()", "base")):
            s, m = med[key]
            print(f"{label:46} {s:8.2f} {m:8.0f} {s / med[ref][0]:6.2f}x {m / med[ref][1]:6.2f}x")
        t_cli, m_cli = med["cli"][0] / med["floor"][0], med["cli"][1] / med["floor"][1]
        t_api, m_api = med["api"][0] / med["base"][0], med["api"][1] / med["base"][1]
        verdict = {True: "met", False: "NOT met"}
        print(f"\ntargets (<= 1.3x time, <= 1.1x peak memory of the process tree): "
              f"CLI time {verdict[t_cli <= 1.3]}, memory {verdict[m_cli <= 1.1]}; "
              f"API time {verdict[t_api <= 1.3]}, memory {verdict[m_api <= 1.1]}")
        if json_out:
            json_out.write_text(json.dumps({"size_mb": mb, "load_average": load, "median": med,
                                            "runs": rows}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--size-mb", type=float,
                    help="instead: save's cost for a model of this size against loading it")
    args = ap.parse_args()
    if args.size_mb:
        return big_model(args.size_mb, args.repeat, args.json)

    from envlock.commands.save import save
    from envlock.settings import Settings

    model = build_model()
    work = Path(tempfile.mkdtemp(prefix="envlock-bench-save-"))
    try:
        model.save(work / "warmup.keras")
        keras_times = []
        for i in range(args.repeat):
            t = time.perf_counter()
            model.save(work / f"plain{i}.keras")
            keras_times.append(time.perf_counter() - t)
        base = statistics.median(keras_times)

        def envlock_save(home: Path, name: str) -> tuple[float, dict[str, float]]:
            settings = Settings.from_env({**os.environ, "ENVLOCK_HOME": str(home)})
            t = time.perf_counter()
            result = save(model, work / name, settings=settings)
            return time.perf_counter() - t, result.seconds

        first = [_first_save_in_fresh_process(work, i) for i in range(args.repeat)]
        warmed = [_first_save_in_fresh_process(work, i, prewarm=True) for i in range(args.repeat)]
        envlock_save(work / "home-warmup", "warmup-envlock.keras")  # starts the reload worker
        cold, warm = [], []
        detail = {}
        for i in range(args.repeat):
            home = work / f"home{i}"  # empty hash cache: every look-up goes to the index
            secs, detail["cold"] = envlock_save(home, f"cold{i}.keras")
            cold.append(secs)
            secs, detail["warm"] = envlock_save(home, f"warm{i}.keras")
            warm.append(secs)
        f, c, w = statistics.median(first), statistics.median(cold), statistics.median(warm)
        p = statistics.median(warmed)
        rows = [
            ("keras model.save", base),
            ("first envlock.save in a process", f),
            ("first save after envlock.prewarm()", p),
            ("later save, cold hash cache", c),
            ("later save, warm hash cache", w),
        ]
        print(f"{'':34} {'seconds':>8} {'ratio':>9} {'added s':>8}")
        for name, s in rows:
            print(f"{name:34} {s:8.3f} {s / base:8.1f}x {s - base:8.3f}")
        print(f"\ntargets: added cold <= 2.0 s: first save {'met' if f - base <= 2.0 else 'NOT met'} "
              f"({'met' if p - base <= 2.0 else 'NOT met'} after prewarm), "
              f"later saves {'met' if c - base <= 2.0 else 'NOT met'}; added warm <= 0.5 s: "
              f"{'met' if w - base <= 0.5 else 'NOT met'}")
        print(f"phases (last cold run): {json.dumps({k: round(v, 3) for k, v in detail['cold'].items()})}")
        print(f"phases (last warm run): {json.dumps({k: round(v, 3) for k, v in detail['warm'].items()})}")
        if args.json:
            args.json.write_text(json.dumps({"keras_save": base, "first": f, "first_prewarmed": p,
                                             "cold": c, "warm": w,
                                             "phases": detail}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
