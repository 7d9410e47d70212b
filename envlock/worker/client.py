"""The host's side of the worker: start it in an interpreter, send requests, read answers.

The worker package (``envlock/_worker``) is loaded in the child under the name
``envlock_worker`` straight from its folder, so nothing else of the host's site-packages
leaks into the locked environment's ``sys.path``.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from envlock import proc
from envlock.errors import InputArrayError, WorkerError
from envlock.worker.payload.protocol import FrameDecoder, ProtocolError, encode

WORKER_DIR = Path(__file__).resolve().parent / "payload"
LOG_TAIL_LINES = 15

_BOOTSTRAP = """\
import importlib.util, os, sys
d = {d!r}
s = importlib.util.spec_from_file_location("envlock_worker", d + "/__init__.py",
                                           submodule_search_locations=[d])
m = importlib.util.module_from_spec(s); sys.modules["envlock_worker"] = m; s.loader.exec_module(m)
import envlock_worker.main as w
code = w.main()
# Every answer is written and flushed: skip the interpreter's teardown, which for TensorFlow
# takes about half a second that the host (and the user) would otherwise wait for.
sys.stdout.flush(); sys.stderr.flush(); os._exit(code)
"""

ProgressFn = Callable[[int, int], None]


def worker_argv(python: str | os.PathLike[str]) -> list[str]:
    return [os.fspath(python), "-c", _BOOTSTRAP.format(d=str(WORKER_DIR))]


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class WorkerClient:
    """One worker process. Use as a context manager; ``close()`` always reaps it."""

    def __init__(self, python: str | os.PathLike[str], *, env: Mapping[str, str], log_path: Path,
                 cwd: str | os.PathLike[str] | None = None, timeout: float | None = None) -> None:
        self.python = os.fspath(python)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.timeout = timeout
        self._proc: Any = None
        self._decoder = FrameDecoder()
        self._pending: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> WorkerClient:
        self._proc = proc.spawn(worker_argv(self.python), env=self.env, stderr_path=self.log_path,
                                cwd=self.cwd)
        self._wait_for(lambda f: f.get("event") == "ready", deadline=self._deadline(120.0))
        return self

    def __enter__(self) -> WorkerClient:
        return self.start() if self._proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        p = self._proc
        if p is None:
            return
        self._proc = None
        # Ctrl-C or SIGTERM on the way out: stop it now. Waiting for a busy worker to finish its
        # batch and notice the closed pipe took ~10 s on a loaded machine.
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        try:
            if not interrupted and p.poll() is None and p.stdin is not None:
                p.stdin.close()  # end of stream: the worker leaves its loop
                p.wait(timeout=10)
        except Exception:
            pass
        proc.kill_tree(p)
        for stream in (p.stdin, p.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- requests ------------------------------------------------------------------------
    def request(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None, on_progress: ProgressFn | None = None) -> Any:
        return self.wait(self.send(op, args), timeout=timeout, on_progress=on_progress)

    def send(self, op: str, args: Mapping[str, Any] | None = None) -> tuple[int, str]:
        """Send a request without waiting; ``wait`` collects the answer. Lets the caller do
        other work (Keras writing the file) while the worker imports TensorFlow."""
        if self._proc is None:
            self.start()
        rid = next(self._ids)
        try:
            self._proc.stdin.write(encode({"id": rid, "op": op, "args": dict(args or {})}))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died(f"while sending {op!r}")
        return rid, op

    def wait(self, ticket: tuple[int, str], *, timeout: float | None = None,
             on_progress: ProgressFn | None = None) -> Any:
        rid, op = ticket

        def match(frame: dict[str, Any]) -> bool:
            if frame.get("event") == "progress" and frame.get("id") == rid:
                if on_progress is not None:
                    on_progress(int(frame["done"]), int(frame["total"]))
                return False
            return frame.get("id") == rid and "ok" in frame

        answer = self._wait_for(match, deadline=self._deadline(timeout if timeout is not None
                                                                else self.timeout))
        if answer["ok"]:
            return answer["result"]
        err = answer["error"]
        if err.get("kind") == "input":
            raise InputArrayError(err["message"])
        hint = None
        if err.get("cause") == "custom_object_missing":
            hint = ("import the module that defines it with --custom-objects MODULE, or run from "
                    "the folder your training script ran in")
        raise WorkerError(f"{op} failed in the worker: {err['message']}", cause=err.get("cause"),
                          log_tail=err.get("traceback", ""), hint=hint)

    # -- plumbing ------------------------------------------------------------------------
    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _wait_for(self, match: Callable[[dict[str, Any]], bool], *, deadline: float | None) -> Any:
        while True:
            while self._pending:
                frame = self._pending.pop(0)
                if match(frame):
                    return frame
            fd = self._proc.stdout.fileno()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                proc.kill_tree(self._proc)
                raise WorkerError(
                    "the worker did not answer in time and was stopped",
                    log_tail=self.log_tail(), hint="raise --timeout if the model is just slow",
                )
            data = os.read(fd, 1 << 16)
            if not data:
                self._died("")
            try:
                self._pending.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                proc.kill_tree(self._proc)
                raise WorkerError(f"the worker broke the protocol: {exc}", log_tail=self.log_tail()) from exc

    def _died(self, when: str) -> None:
        p = self._proc
        try:
            rc = p.wait(timeout=10)
        except Exception:
            proc.kill_tree(p)
            rc = p.returncode if p.returncode is not None else -9
        tail = self.log_tail()
        last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
        msg = f"the worker {_signal_name(rc)}" + (f" {when}" if when else "")
        if rc == -signal.SIGKILL:
            # Its log ends with whatever it printed last, unrelated to the kill.
            msg += " (out of memory, or stopped from outside)"
        elif last:
            msg += f": {last.strip()}"
        raise WorkerError(msg, log_tail=tail, hint=f"full log: {self.log_path}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
