"""`envlock diff`: the lock against an environment, package by package, flag by flag.

No model is loaded: a worker in the target interpreter only imports the framework to read
its effective settings (with this shell's variables, not the recorded ones).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from envlock.commands.results import DiffResult, PackageChange
from envlock.commands.run import recorded_environment
from envlock.diagnosis.diagnose import Observed, diagnose
from envlock.diagnosis.findings import changes_predictions, custom_object_packages
from envlock.envs.interpreters import python_version
from envlock.envs.inventory import inventory
from envlock.errors import BadInputError, WorkerError
from envlock.facts.gpu import gpu_facts
from envlock.facts.host import platform_facts
from envlock.locking.reqfile import NOT_RUNTIME, locked_pins
from envlock.settings import Settings
from envlock.sidecar.store import read_sidecar
from envlock.worker.client import WorkerClient


def diff(model: str | os.PathLike[str], *, python: str | os.PathLike[str] | None = None,
         settings: Settings | None = None) -> DiffResult:
    settings = settings or Settings.from_env()
    sc = read_sidecar(model)
    target = Path(python) if python is not None else Path(sys.executable)
    if not target.exists():
        raise BadInputError(f"{target}: no such interpreter")
    if python_version(target) is None:
        raise BadInputError(f"{target}: not a Python interpreter (it does not answer `-c` with its version)",
                            hint="give --python the path of a python executable, e.g. .venv/bin/python")
    locked = locked_pins(sc.file("requirements.lock.txt").read_text())
    current = inventory(target)
    custom = custom_object_packages(sc.get("custom_objects", default=[]))
    changes = []
    for name in sorted(set(locked) | set(current)):
        if name in NOT_RUNTIME or locked.get(name) == current.get(name):
            continue
        changes.append(PackageChange(name, locked.get(name), current.get(name),
                                     changes_predictions(name, custom)))
    changes.sort(key=lambda c: (not c.matters, c.name))

    obs = Observed(packages=current, platform=platform_facts(), gpu=gpu_facts(),
                   custom_modules=custom)
    framework_error = None
    log = settings.home / "logs" / f"diff-{os.getpid()}.log"
    try:
        with WorkerClient(target, env=recorded_environment(sc, use_recorded=False), log_path=log,
                          timeout=300) as client:
            hello = client.request("hello")
            obs.python = {"version": hello["python"], "implementation": hello["implementation"]}
            client.request("prepare", {})
            facts = client.request("facts")
            obs.framework, obs.determinism = facts["framework"], facts["determinism"]
    except WorkerError as exc:
        framework_error = exc.message
    if obs.python is None:
        obs.python = {"version": _python_version(target)}
    # Packages are listed on their own above; the findings cover everything else.
    findings, _ = diagnose(sc.manifest, {}, obs, mismatch=False)
    return DiffResult(Path(model), str(target), tuple(changes), tuple(findings), framework_error)


def _python_version(python: Path) -> str:
    from envlock import proc

    return proc.run([python, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
