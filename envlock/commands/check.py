"""`envlock check`: replay the probe on this machine and explain every difference.

Replays twice in one worker and once in a second, fresh worker, so that in-process and
cross-process nondeterminism are told apart; gathers what the target looks like (framework,
determinism settings, packages, custom objects, weight fingerprint, hardware) and hands it to
diagnose() with the manifest.
"""

from __future__ import annotations

import contextlib
import os
import platform as _platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envlock.commands.results import CheckResult
from envlock.commands.run import ModelSession, resolve_environment
from envlock.diagnosis.compare import (
    MISMATCH,
    OutputComparison,
    compare_outputs,
    overall_status,
)
from envlock.diagnosis.diagnose import Observed, diagnose
from envlock.diagnosis.findings import custom_object_packages
from envlock.errors import WorkerError
from envlock.facts.gpu import gpu_facts
from envlock.facts.host import platform_facts
from envlock.facts.modelfile import file_sha256, tree_sha256
from envlock.locking.reqfile import locked_pins
from envlock.worker.payload.framework import ENV_VARS

ERROR = "error"  # the model could not be loaded or run on the target


def _model_sha(path: Path) -> str | None:
    if path.is_dir():
        return tree_sha256(path)[0]
    return file_sha256(path) if path.is_file() else None


@dataclass
class _Replay:
    """What replaying the probe gave; ``fresh`` is the second worker's replay, still running."""

    outputs: list[OutputComparison] = field(default_factory=list)
    status: str = ERROR
    error: str | None = None
    fresh: Future[dict[str, np.ndarray] | None] | None = None


def check(model: str | os.PathLike[str], *, atol: float | None = None, rtol: float | None = None,
          **session_kwargs: Any) -> CheckResult:
    """Check a saved model on this machine (in the locked environment unless strategy says)."""
    path = Path(model)
    requested = session_kwargs.get("strategy", "auto")
    # check observes a changed model file, the user's own code and untrusted code, and explains
    # them, where run refuses them. With --strategy current the user's modules come first: the
    # question is how *this* environment computes.
    session_kwargs.update(verify_model_file=False, code_first=requested != "current",
                          skip_untrusted_code=True)
    session = ModelSession(path, **session_kwargs)
    m = session.sidecar.manifest
    tol = dict(m["probe"]["tolerance"])
    if atol is not None:
        tol["atol"] = atol
    if rtol is not None:
        tol["rtol"] = rtol
    locked = locked_pins(session.sidecar.file("requirements.lock.txt").read_text())
    obs = Observed(model_sha256=_model_sha(path))
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="envlock-check")
    gpu_f = pool.submit(gpu_facts)
    plat_f = pool.submit(platform_facts)
    replay = _Replay()
    t0 = time.perf_counter()
    try:
        _replay(session, obs, replay, pool, tol, requested=requested,
                on_build_event=session_kwargs.get("on_build_event"))
        if session.use_recorded_env:
            obs.shell_env = {k: os.environ.get(k) for k in ENV_VARS}
        obs.custom_modules = custom_object_packages(m.get("custom_objects", []))
        obs.gpu = gpu_f.result()
        obs.platform = plat_f.result()
        if obs.python is None and session.resolved is not None and session.resolved.strategy == "current":
            obs.python = {"version": _platform.python_version()}
    finally:
        if replay.fresh is not None:
            # Its worker is closed by the thread itself; wait so that none outlives check().
            with contextlib.suppress(Exception):
                replay.fresh.result()
        pool.shutdown(wait=False)
        resolved_env = session.resolved
        session.close()
    seconds = dict(session.seconds)
    seconds["total"] = time.perf_counter() - t0
    findings, notes = diagnose(m, locked, obs, mismatch=replay.status in (MISMATCH, ERROR))
    return CheckResult(
        model=path, status=replay.status, outputs=tuple(replay.outputs), findings=tuple(findings),
        notes=tuple(notes), strategy=resolved_env.strategy if resolved_env else None,
        python=str(resolved_env.python) if resolved_env else None, tolerance=tol, error=replay.error,
        seconds=seconds,
    )


def _replay(session: ModelSession, obs: Observed, replay: _Replay, pool: ThreadPoolExecutor,
            tol: dict[str, float], *, requested: str, on_build_event: Callable[[Any], None] | None
            ) -> None:
    """Replay the probe twice in one worker and once in a fresh one, comparing with the
    reference; a worker failure becomes ``replay.error`` and ``obs.load_error``."""
    try:
        # Resolve (and build) the environment once, then start both workers together: the
        # second, fresh one imports the framework while the first is being questioned.
        resolved = resolve_environment(
            session.sidecar, settings=session.settings, strategy=requested,
            allow_python_download=session.allow_python_download, find_links=session.find_links,
            on_event=on_build_event)
        session.strategy = resolved.strategy
        replay.fresh = pool.submit(_fresh_replay, session)
        try:
            session.open()
        except WorkerError as exc:
            # The model (or its framework) does not load: what the environment is still
            # explains why, so gather its facts from the same worker without the model.
            replay.error = exc.message
            obs.load_error = {"message": exc.message, "cause": exc.cause}
            _gather_facts(session, obs, loaded=False)
            raise
        _gather_facts(session, obs, loaded=True)
        _gather_model_facts(session, obs)
        _, reference = session.probe_arrays()
        first = session.replay_probe("a")
        second = session.replay_probe("b")
        obs.in_process_equal = _bitwise(first, second)
        replay.outputs = compare_outputs(reference, first, atol=float(tol["atol"]), rtol=float(tol["rtol"]))
        replay.status = overall_status(replay.outputs)
        fresh = replay.fresh.result()
        obs.cross_process_equal = _bitwise(first, fresh) if fresh is not None else None
    except WorkerError as exc:
        replay.error = exc.message
        if obs.load_error is None:
            obs.load_error = {"message": exc.message, "cause": exc.cause}


def _gather_model_facts(session: ModelSession, obs: Observed) -> None:
    """What the loaded model is made of: its custom objects and modules, its jit_compile, its
    arrays that are not weights, and the fingerprint of its weights."""
    obs.custom_objects = session.loaded.get("custom_objects")
    obs.modules = session.prepared.get("module_facts")
    obs.static_findings = session.loaded.get("static_findings") or []
    jit = session.loaded.get("jit_compile") or {}
    obs.model_jit = jit.get("effective")
    obs.jit_not_honoured = jit.get("stored") if jit.get("honoured") is False else None
    obs.untracked_arrays = session.loaded.get("untracked_arrays")
    client = session.client
    assert client is not None
    obs.fingerprint = client.request("fingerprint")


def _gather_facts(session: ModelSession, obs: Observed, *, loaded: bool) -> None:
    """Python, framework, settings and packages as the worker sees them; with ``loaded`` False
    (the load failed), whatever a worker that may have lost its model still answers."""
    client = session.client
    if client is None or not client.alive():
        return
    try:
        hello = client.request("hello")
        obs.python = {"version": hello["python"], "implementation": hello["implementation"]}
        facts = client.request("facts")
        obs.framework, obs.determinism = facts["framework"], facts["determinism"]
        obs.packages = {d["name"]: d["version"] for d in client.request("inventory")}
    except WorkerError:
        if loaded:
            raise


def _bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def _fresh_replay(first: ModelSession) -> dict[str, np.ndarray] | None:
    """The probe once more in a second, fresh worker of the same (already resolved) environment.

    None when that worker cannot load the model: the first one's error says why.
    """
    second = ModelSession(first.model, settings=first.settings, strategy=first.strategy,
                          use_recorded_env=first.use_recorded_env, trust_code=first.trust_code,
                          unsafe=first.unsafe, timeout=first.timeout, find_links=first.find_links,
                          verify_model_file=False, code_first=first.code_first,
                          skip_untrusted_code=first.skip_untrusted_code,
                          custom_objects=first.custom_objects)
    try:
        second.open()
        return second.replay_probe("fresh")
    except WorkerError:
        return None
    finally:
        second.close()
