"""The reload worker of ``envlock.save``: the model is loaded back from its file in a fresh
interpreter of this environment, predicted there, and compared with the model in memory.

One warm worker is kept per process (``prewarm`` starts it early) and reused by later saves
that would read the same things: same interpreter, folder, environment and custom modules.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envlock.errors import MismatchError
from envlock.fs import log_dir
from envlock.settings import Settings
from envlock.worker.client import WorkerClient

if TYPE_CHECKING:
    from envlock.commands.save import SaveOptions

# What the reload worker is given from the caller before each load: these change how the model
# is built and what it predicts. The thread pools cannot change once TensorFlow has run an op:
# they are given when the worker starts, and a worker started with others is not reused.
CALLER_SETTINGS = ("dtype_policy", "floatx", "op_determinism", "tf32", "jit")
CALLER_THREADS = ("intra_op_threads", "inter_op_threads")
CALLER_RECORDED = (*CALLER_SETTINGS, *CALLER_THREADS)


def caller_facts(model: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The determinism settings of this (the training) process, and the numpy arrays its
    model's layers hold outside their variables."""
    from envlock.worker.payload.framework import determinism_facts
    from envlock.worker.payload.model import untracked_arrays

    try:
        facts = determinism_facts()
    except Exception:  # a framework too old or too new to say: the worker's facts stand
        facts = {}
    try:
        untracked = untracked_arrays(model)
    except Exception:
        untracked = []
    return {k: facts.get(k) for k in CALLER_RECORDED if k in facts}, untracked


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    # The environment being captured is this one: the worker gets it as it is, so that every
    # setting it reads (oneDNN, threads, hash seed) is the user's.
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def caller_threads() -> dict[str, Any]:
    """This process's TensorFlow thread pools (0: TensorFlow's default), when TensorFlow is
    already imported here; {} otherwise (a prewarm at the top of a script: the defaults)."""
    if "tensorflow" not in sys.modules:
        return {}
    from envlock.worker.payload.framework import determinism_facts

    try:
        facts = determinism_facts()
    except Exception:
        return {}
    return {k: facts.get(k) for k in CALLER_THREADS if facts.get(k)}


def start_worker(log_dir: Path, sys_path: Sequence[str], modules: Sequence[str],
                 threads: Mapping[str, Any] | None = None, *, environ: Mapping[str, str]
                 ) -> tuple[WorkerClient, tuple[int, str]]:
    """A worker on this interpreter with ``environ`` (the caller's environment), and the
    ticket of its `prepare`."""
    client = WorkerClient(sys.executable, env=worker_env(environ),
                          log_path=log_dir / f"save-worker-{os.getpid()}-{time.time_ns()}.log",
                          cwd=os.getcwd(), timeout=600)
    client.start()
    # The thread pools are set in `prepare`, after TensorFlow's import and before its first op.
    ticket = client.send("prepare", {"sys_path": list(sys_path), "modules": list(modules),
                                     "settings": dict(threads or {})})
    return client, ticket


class Reloader:
    """One warm reload worker per process, for repeated ``envlock.save`` calls.

    The first save pays for the worker's framework import; later saves (checkpoints in a
    training loop) reuse the worker when it was started with the same interpreter, folder,
    environment variables and custom modules, so that what it reads is still what this
    process would read. Each load clears the Keras session first, so a load sees what a
    fresh process would. Not used when __main__ objects are captured (their source may
    change between saves), and dropped after any failure.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (key, worker, the ticket of its pending `prepare`, or None once answered)
        self._idle: tuple[str, WorkerClient, tuple[int, str] | None] | None = None
        atexit.register(self.close)

    def acquire(self, key: str, start: Callable[[], tuple[WorkerClient, tuple[int, str]]]
                ) -> tuple[WorkerClient, tuple[int, str] | None]:
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None:
            if idle[0] == key and idle[1].alive():
                return idle[1], idle[2]
            idle[1].close()
        return start()

    def release(self, key: str, client: WorkerClient, *, keep: bool,
                pending: tuple[int, str] | None = None) -> None:
        if keep:
            with self._lock:
                if self._idle is None:
                    self._idle = (key, client, pending)
                    return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None:
            idle[1].close()


def save_sys_path() -> list[str]:
    return [os.getcwd(), *(p for p in sys.path if p and os.path.isdir(p))]


def prewarm(*, custom_objects: Sequence[str] = (), settings: Settings | None = None) -> None:
    """Start the reload worker now, so the first ``envlock.save`` of this process finds
    TensorFlow already imported in it (the bulk of a first save). Call it at the top of a
    training script; it returns at once. A save from another folder, with other environment
    variables or custom modules, starts a fresh worker anyway.
    """
    settings = settings or Settings.from_env()
    environ = os.environ  # what the worker is given, and the key a later save matches
    sys_path = save_sys_path()
    logs = log_dir(settings)
    threads = caller_threads()
    client, ticket = start_worker(logs, sys_path, custom_objects, threads, environ=environ)
    RELOADER.release(reload_key(sys_path, custom_objects, threads, environ), client, keep=True,
                     pending=ticket)


RELOADER = Reloader()


def reload_key(sys_path: Sequence[str], modules: Sequence[str], threads: Mapping[str, Any],
               environ: Mapping[str, str]) -> str:
    """What a warm worker must have been started with to be reused: ``environ`` is the
    environment it was (or would be) given."""
    parts = [sys.executable, os.getcwd(), *sys_path, "|", *modules, "|",
             *(f"{k}={v}" for k, v in sorted(threads.items())), "|",
             *(f"{k}={v}" for k, v in sorted(environ.items()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def untracked_lost(loaded: list[dict[str, Any]], other: list[dict[str, Any]] | None,
                    against: str) -> list[dict[str, Any]]:
    """Layer attributes holding arrays whose values differ between the reloaded model and
    ``other`` (the model in memory, or a second load): state the file does not keep."""
    by_key = {(u["layer"], u["attribute"]): u for u in other or []}
    lost = []
    for u in loaded:
        o = by_key.get((u["layer"], u["attribute"]))
        if o is not None and o["sha256"] != u["sha256"]:
            lost.append({"code": "untracked_state", "layer": u["layer"], "attribute": u["attribute"],
                         "evidence": f"{u['class']}.{u['attribute']} is a numpy array, not a weight: "
                                     f"the reloaded model holds other values than {against}"})
    return lost


def _predict_in_memory(model: Any, probe_in: Path, names: Sequence[str], batch_size: int
                       ) -> dict[str, np.ndarray]:
    with np.load(probe_in, allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    x: Any = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    y = model.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(y, Mapping):
        return {k: np.asarray(v) for k, v in y.items()}
    ys = list(y) if isinstance(y, (list, tuple)) else [y]
    return {n: np.asarray(v) for n, v in zip(names, ys)}


def against_in_memory(model: Any, probe_in: Path, reloaded: dict[str, np.ndarray], repeatable: bool,
                       options: SaveOptions, path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """The probe predicted by the model in memory, the one the user trained: the reference is
    what it predicts. A reloaded model that predicts otherwise lost something on the way
    through the file (state that is not a variable, a dtype policy its config dropped):
    refused, or with allow_mismatch recorded with the in-memory outputs as the reference."""
    from envlock.diagnosis.compare import compare_outputs

    try:
        mine = _predict_in_memory(model, probe_in, list(reloaded), options.batch_size)
    except Exception as exc:  # a model that cannot predict in this process: the reload stands
        return reloaded, f"the probe could not be predicted with the model in memory ({exc})"
    same = mine.keys() == reloaded.keys() and all(
        mine[k].dtype == reloaded[k].dtype and np.array_equal(mine[k], reloaded[k], equal_nan=True)
        for k in mine)
    if same:
        return reloaded, None
    if not repeatable:
        return reloaded, ("the model is random at inference, so the model in memory and the one "
                          "loaded back could not be compared")
    worst = ""
    if mine.keys() == reloaded.keys():
        comps = compare_outputs(mine, reloaded, atol=options.atol, rtol=options.rtol)
        w = max(comps, key=lambda c: c.max_abs_diff)
        worst = (f" (output {w.name}: up to {w.max_abs_diff:.3g}"
                 + (f", dtype {reloaded[w.name].dtype} instead of {mine[w.name].dtype}"
                    if mine[w.name].dtype != reloaded[w.name].dtype else "") + ")")
    what = (f"{path.name} loaded back predicts other values than the model in memory{worst}: state "
            "that is not a variable was not saved, or a global setting its config dropped")
    if not options.allow_mismatch:
        raise MismatchError(f"reload_differs: {what}", cause="weights_not_restored",
                            hint="fix what the file does not keep (get_config, weights) and save "
                            "again; allow_mismatch=True records the in-memory predictions as the "
                            "reference")
    if mine.keys() != reloaded.keys():
        return reloaded, what
    return mine, what + " (saved anyway: the reference is the model in memory's predictions)"
