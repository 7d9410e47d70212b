"""The README's first command: train, save with envlock, show the sidecar (and run it).

Runs every step as a user would type it, printing each command first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out"


def step(*argv: str) -> None:
    print(f"\n$ {' '.join(argv)}", flush=True)
    subprocess.run(argv, cwd=OUT, check=True)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for f in ("layers.py", "train.py"):
        shutil.copy(HERE / f, OUT / f)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    step(sys.executable, "train.py", "model.keras")
    envlock = [sys.executable, "-m", "envlock"]
    step(*envlock, "show", "model.keras")
    print("\nsidecar files:")
    for p in sorted((OUT / "model.keras.envlock").rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}  ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
