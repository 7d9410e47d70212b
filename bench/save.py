"""What `envlock save` adds over Keras' own `model.save`, cold and warm hash cache.

Measured in one run on this machine, against a baseline measured in the same run:
    ./dev bench save            (or: python bench/save.py [--repeat N])
Prints seconds and ratios; never asserts (the machine is noisy). Targets (issue 2): at most
2 s added with a cold hash cache for a TensorFlow environment, at most 0.5 s warm.
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

        cold, warm = [], []
        detail = {}
        for i in range(args.repeat):
            home = work / f"home{i}"  # empty hash cache: every look-up goes to the index
            secs, detail["cold"] = envlock_save(home, f"cold{i}.keras")
            cold.append(secs)
            secs, detail["warm"] = envlock_save(home, f"warm{i}.keras")
            warm.append(secs)
        c, w = statistics.median(cold), statistics.median(warm)
        rows = [
            ("keras model.save", base, 1.0, 0.0),
            ("envlock.save, cold hash cache", c, c / base, c - base),
            ("envlock.save, warm hash cache", w, w / base, w - base),
        ]
        print(f"{'':34} {'seconds':>8} {'ratio':>8} {'added s':>8}")
        for name, s, r, added in rows:
            print(f"{name:34} {s:8.3f} {r:8.1f}x {added:8.3f}")
        print(f"\ntargets: added cold <= 2.0 s ({'met' if c - base <= 2.0 else 'NOT met'}), "
              f"added warm <= 0.5 s ({'met' if w - base <= 0.5 else 'NOT met'})")
        print(f"phases (last cold run): {json.dumps({k: round(v, 3) for k, v in detail['cold'].items()})}")
        print(f"phases (last warm run): {json.dumps({k: round(v, 3) for k, v in detail['warm'].items()})}")
        if args.json:
            args.json.write_text(json.dumps({"keras_save": base, "cold": c, "warm": w, "phases": detail}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
