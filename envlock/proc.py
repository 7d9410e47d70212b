"""The one place that runs subprocesses.

Takes argv lists (never a shell string), starts from a clean environment (no stray
PYTHONPATH, PIP_*, UV_*, VIRTUAL_ENV, CONDA_PREFIX; UTF-8 forced), logs the command, and
turns a failure into a :class:`CommandError` carrying the argv and the tail of stderr.
Output is read on threads so that a chatty child cannot deadlock on a full pipe.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from envlock.errors import CommandError

log = logging.getLogger("envlock.proc")

# Variables that would make a child install into, or import from, the wrong place.
_STRIPPED_PREFIXES = ("PIP_", "UV_", "PYTHON", "CONDA_", "VIRTUAL_ENV", "__PYVENV")
STDERR_TAIL_LINES = 30


# The parent-death signal, without ``preexec_fn`` (CPython documents it as unsafe in a process
# with threads, and save starts children while its index threads run). The child is this
# small Python program: it asks Linux for SIGKILL when the thread that started it dies
# (PR_SET_PDEATHSIG, which survives exec), checks that the parent has not died already, then
# becomes the real command. ``start_new_session`` gives it a session of its own in C, between
# fork and exec, so that kill_tree reaches the whole group.
_PDEATHSIG_SHIM = """\
import os, signal, sys
parent, path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
except (ImportError, OSError, AttributeError):
    pass
if os.getppid() != parent:  # the parent died before prctl: no signal would come
    os._exit(137)
for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these; give the command the defaults back
    signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    os.execv(path, argv)
except OSError as exc:
    sys.stderr.write(f"{path}: {exc.strerror}\\n")
    os._exit(127)
"""


def _shim_python() -> str | None:
    """The interpreter that runs the shim: this one, on Linux, when it can be found."""
    if not sys.platform.startswith("linux") or not sys.executable or not os.path.isfile(sys.executable):
        return None
    return sys.executable


def _executable(args: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> str:
    """The file that ``args[0]`` names, found as Popen would (the child's PATH, relative to ``cwd``);
    the same FileNotFoundError or PermissionError as Popen when there is none or it cannot run."""
    name = args[0]
    if os.sep in name:
        path = name if os.path.isabs(name) or cwd is None else os.path.join(os.fspath(cwd), name)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    else:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    return name if os.sep in name else path  # a relative path stays one: the child runs in cwd


def _dying_with_us(args: list[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> list[str]:
    """``args`` wrapped in the parent-death shim (Linux), or as they are where there is none."""
    shim = _shim_python()
    if shim is None:
        return args
    return [shim, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), _executable(args, env, cwd), *args]


def clean_env(
    extra: Mapping[str, str] | None = None,
    *,
    keep: Sequence[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a child gets: ours minus installer/interpreter variables, plus ``extra``.

    ``keep`` names variables (or prefixes ending in ``*``) to pass through anyway, for
    example ``UV_CACHE_DIR`` so that every uv call shares one cache.
    """
    src = dict(os.environ if base is None else base)
    keep_exact = {k for k in keep if not k.endswith("*")}
    keep_prefix = tuple(k[:-1] for k in keep if k.endswith("*"))
    env: dict[str, str] = {}
    for k, v in src.items():
        kept = k in keep_exact or (bool(keep_prefix) and k.startswith(keep_prefix))
        if kept or not k.startswith(_STRIPPED_PREFIXES):
            env[k] = v
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    env.setdefault("LC_ALL", src.get("LC_ALL", "C.UTF-8"))
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    what: str | None = None,
    input_text: str | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
) -> Completed:
    """Run ``argv`` to completion and return its output.

    ``env`` is the full child environment (build it with :func:`clean_env`); None means
    ``clean_env()``. ``on_stderr_line`` sees each stderr line as it arrives (for progress).
    """
    args = [os.fspath(a) for a in argv]
    child_env = clean_env() if env is None else dict(env)
    log.debug("run: %s", " ".join(args))
    proc = _start(args, child_env, cwd, stdin_pipe=input_text is not None, what=what)
    output = _Output(proc, on_stderr_line)
    try:
        if input_text is not None:
            assert proc.stdin is not None
            proc.stdin.write(input_text)
            proc.stdin.close()
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output.join(timeout=5)
        raise CommandError(args, -9, "".join(output.err) + f"\ntimed out after {timeout:.0f}s",
                           what=what) from None
    except BaseException:
        # Ctrl-C or anything else: never leave the child running behind us.
        kill_tree(proc)
        raise
    output.join()
    done = Completed(args, returncode, "".join(output.out), "".join(output.err))
    if check and returncode != 0:
        raise CommandError(args, returncode, _tail(done.stderr or done.stdout), what=what)
    return done


def _start(args: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None, *,
           stdin_pipe: bool, what: str | None) -> subprocess.Popen[str]:
    """``args`` started in a session of its own, dying with us, its output on text pipes; a
    program that is not there is a CommandError with exit 127."""
    try:
        return subprocess.Popen(
            _dying_with_us(args, env, cwd),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=os.name == "posix",
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, str(exc), what=what) from exc


class _Output:
    """A child's stdout and stderr, each read on a thread of its own as the lines come."""

    def __init__(self, proc: subprocess.Popen[str], on_stderr_line: Callable[[str], None] | None) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=_pump, args=(proc.stdout, self.out, None), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, self.err, on_stderr_line), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout=timeout)


def _pump(stream: IO[str], sink: list[str], cb: Callable[[str], None] | None) -> None:
    for line in stream:
        sink.append(line)
        if cb is not None:
            cb(line.rstrip("\n"))


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str],
    stderr_path: Path,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child with binary pipes on stdin/stdout and stderr sent to a file.

    Used for the worker: frames go over the pipes, TensorFlow's logs go to ``stderr_path``.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("spawn: %s (stderr -> %s)", " ".join(args), stderr_path)
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    with open(stderr_path, "ab") as err:
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandError(args, 127, str(exc), what="could not start the worker") from exc


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child started by :func:`run` or :func:`spawn`, with its process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):  # a zombie we cannot reap
        proc.wait(timeout=10)
