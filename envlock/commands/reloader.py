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
from typing import Any

from envlock.fs import log_dir
from envlock.settings import Settings
from envlock.worker.client import WorkerClient

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


def worker_env() -> dict[str, str]:
    # The environment being captured is this one: the worker gets it as it is, so that every
    # setting it reads (oneDNN, threads, hash seed) is the user's.
    env = dict(os.environ)
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
                  threads: Mapping[str, Any] | None = None) -> tuple[WorkerClient, tuple[int, str]]:
    client = WorkerClient(sys.executable, env=worker_env(),
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
    sys_path = save_sys_path()
    logs = log_dir(settings)
    threads = caller_threads()
    client, ticket = start_worker(logs, sys_path, custom_objects, threads)
    RELOADER.release(reload_key(sys_path, custom_objects, threads), client, keep=True, pending=ticket)


RELOADER = Reloader()


def reload_key(sys_path: Sequence[str], modules: Sequence[str], threads: Mapping[str, Any]) -> str:
    parts = [sys.executable, os.getcwd(), *sys_path, "|", *modules, "|",
             *(f"{k}={v}" for k, v in sorted(threads.items())), "|",
             *(f"{k}={v}" for k, v in sorted(os.environ.items()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
