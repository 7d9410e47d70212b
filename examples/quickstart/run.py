"""The README's first command: train a tiny model with a custom layer, save it with envlock,
run it in a rebuilt environment, and show the check.

Every step runs as a user would type it, and is printed first.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out"


def step(*argv: str, capture: bool = False) -> str:
    shown = shlex.join(argv).replace(f"{shlex.quote(sys.executable)} -m envlock", "envlock")
    print(f"\n$ {shown}", flush=True)
    proc = subprocess.run(argv, cwd=OUT, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return proc.stdout or ""


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for f in ("layers.py", "train.py"):
        shutil.copy(HERE / f, OUT / f)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    py = sys.executable
    envlock = [py, "-m", "envlock"]

    step(py, "train.py", "model.keras")
    step(*envlock, "show", "model.keras")
    print("\nsidecar files:")
    for p in sorted((OUT / "model.keras.envlock").rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}  ({p.stat().st_size:,} bytes)")

    # Rebuild the locked environment (a cached venv, built by uv from the hashed lock) and
    # predict inside it through the worker, after it replays the probe on this machine.
    doc = json.loads(step(*envlock, "run", "model.keras", "--input", "model.keras.input.npy",
                          "--output", "predictions.npy", "--strategy", "venv", "--json", capture=True))
    print(f"  environment: {doc['env_path']} ({'built now' if doc['built'] else 'reused'})")
    print(f"  probe on this machine: {doc['validation']['status']}; wrote {doc['output']} "
          f"({doc['rows']} rows)")

    # The same predictions as the training process itself, bit for bit?
    same = step(py, "-c", "import keras, numpy as np, layers; m = keras.models.load_model('model.keras'); "
                "x = np.load('model.keras.input.npy'); "
                "print(np.array_equal(m.predict(x, verbose=0), np.load('predictions.npy')))",
                capture=True).strip().splitlines()[-1]
    print(f"  bitwise equal to model.predict in the training environment: {same}")

    step(*envlock, "check", "model.keras", "--strategy", "venv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
