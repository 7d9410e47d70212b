"""The environment a saved model runs in: which one (the ``--strategy``: the current
interpreter, a cached venv, or a cached conda prefix, built when missing), and the variables
its worker starts with (the determinism settings recorded at save)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envlock import proc
from envlock.envs.cache import EnvCache
from envlock.envs.inventory import satisfies
from envlock.envs.key import EnvSpec, default_platform_tag
from envlock.errors import BadInputError, EnvironmentBuildError
from envlock.locking.reqfile import NOT_RUNTIME, locked_pins
from envlock.settings import Settings
from envlock.sidecar.store import Sidecar
from envlock.worker.payload.framework import ENV_VARS

STRATEGIES = ("auto", "current", "venv", "conda")
# Not part of what the model computes: the host's own tool, and its installers.
@dataclass(frozen=True)
class Resolved:
    strategy: str
    python: Path
    env_path: Path | None
    built: bool


def python_version(sc: Sidecar) -> str:
    return str(sc.manifest["python"]["version"])


def current_satisfies(sc: Sidecar) -> bool:
    """The interpreter we run in has exactly the locked set (and the locked Python)."""
    import platform

    if platform.python_version() != python_version(sc):
        return False
    pins = {k: v for k, v in locked_pins(sc.file("requirements.lock.txt").read_text()).items()
            if k not in NOT_RUNTIME}
    return satisfies(Path(sys.executable), pins, ignore=NOT_RUNTIME)


def resolve_environment(sc: Sidecar, *, settings: Settings, strategy: str = "auto",
                        allow_python_download: bool = False, find_links: tuple[str, ...] = (),
                        on_event: Callable[[Any], None] | None = None) -> Resolved:
    """The environment to run in. ``locked`` (``envlock env``'s default) is the locked environment
    itself, never this interpreter: conda when the sidecar holds a conda-lock.yml, else venv."""
    if strategy not in (*STRATEGIES, "locked"):
        raise BadInputError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    conda = sc.file("conda-lock.yml").is_file()
    if strategy == "locked":
        strategy = "conda" if conda else "venv"
    if strategy == "conda" and not conda:
        raise EnvironmentBuildError("the conda strategy needs a conda-lock.yml in the sidecar; "
                                    "this sidecar was captured outside conda")
    if strategy == "current" or (strategy == "auto" and not conda and current_satisfies(sc)):
        return Resolved("current", Path(sys.executable), None, False)
    if conda and strategy != "venv":  # auto or conda: a conda lock is rebuilt with its conda packages
        from envlock.envs.conda import CondaSpec, current_matches, ensure_conda_env

        if strategy == "auto" and current_matches(sc, Path(sys.prefix)) and current_satisfies(sc):
            return Resolved("current", Path(sys.executable), None, False)
        env = ensure_conda_env(CondaSpec.from_sidecar(sc, find_links=find_links), settings,
                               progress=on_event)
        return Resolved("conda", env.python, env.path, env.built)
    wheels = sc.file("wheels")
    links = (*find_links, *( (str(wheels),) if wheels.is_dir() else ()))
    # A sidecar saved with --vendor holds the file of every requirement: build from it alone,
    # without asking any index (one that no longer has a version, or cannot be reached).
    vendored = wheels.is_dir() and bool(sc.get("packages", "vendored", "complete"))
    spec = EnvSpec.from_lock(sc.file("requirements.lock.txt"), python_version(sc),
                             platform_tag=default_platform_tag(), find_links=links,
                             no_index=vendored, offline=True if vendored else None,
                             allow_python_download=allow_python_download)
    env = EnvCache(settings).ensure(spec, progress=on_event)
    return Resolved("venv", env.python, env.path, env.built)


def recorded_environment(sc: Sidecar, *, use_recorded: bool) -> dict[str, str]:
    """The worker's environment: clean, plus the determinism variables as they were at save.

    A variable unset at save is unset here too, so the user's shell cannot change the numbers
    behind envlock's back; ``--no-recorded-env`` passes the current values through instead.
    """
    env = proc.clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if not use_recorded:
        for k in ENV_VARS:
            if k in os.environ:
                env[k] = os.environ[k]
        return env
    recorded = (sc.get("determinism", "env") or {})
    for k in ENV_VARS:
        value = recorded.get(k)
        if value is None:
            env.pop(k, None)
        else:
            env[k] = str(value)
    # oneDNN's default depends on the CPU (on where AVX-512/AMX exist): re-apply the state it
    # had at save, not only the variable, so a model saved with it on by default does not run
    # with it off elsewhere (or the other way round).
    effective = sc.get("determinism", "onednn", "effective")
    if isinstance(effective, bool):
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if effective else "0"
    return env


def recorded_settings(sc: Sidecar) -> dict[str, Any]:
    d = sc.get("determinism") or {}
    return {k: d.get(k) for k in ("op_determinism", "tf32", "intra_op_threads", "inter_op_threads",
                                  "jit", "dtype_policy", "floatx")}


__all__ = ["STRATEGIES", "Resolved", "current_satisfies", "python_version", "recorded_environment",
           "recorded_settings", "resolve_environment"]
