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
from envlock.saving import prewarm, save
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from envlock.saving import save
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
