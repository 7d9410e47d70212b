"""envlock.proc for real: children in a session of their own that die with envlock, started
without ``preexec_fn`` while other threads run, and failures that read as before."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from envlock import proc
from envlock.errors import CommandError

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond: Callable[[], object], seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_only_proc_imports_subprocess() -> None:
    importers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "envlock").rglob("*.py")
                 if re.search(r"^\s*(import subprocess|from subprocess import)", p.read_text(), re.M)]
    assert importers == ["envlock/proc.py"]
    assert "preexec_fn" not in (ROOT / "envlock" / "proc.py").read_text().replace(
        "without ``preexec_fn``", "")


def test_output_exit_codes_and_input_pass_through() -> None:
    done = proc.run(["sh", "-c", "cat; echo err >&2; exit 3"], input_text="héllo\n", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "héllo\n", "err\n")
    assert done.argv == ["sh", "-c", "cat; echo err >&2; exit 3"]
    with pytest.raises(CommandError) as err:
        proc.run(["sh", "-c", "echo broken >&2; exit 5"], what="the thing failed")
    assert err.value.returncode == 5 and "broken" in str(err.value)


def test_a_missing_or_unrunnable_program_fails_as_popen_would(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as err:
        proc.run(["envlock-no-such-program"])
    assert err.value.returncode == 127 and "No such file or directory" in str(err.value)
    with pytest.raises(CommandError):
        proc.run([tmp_path / "missing"])
    text = tmp_path / "notes.txt"
    text.write_text("not a program\n")
    with pytest.raises(PermissionError):
        proc.run([text])
    with pytest.raises(PermissionError):
        proc.run([tmp_path])


def test_relative_programs_are_found_from_cwd_and_the_childs_path(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "hello-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho \"$0 $*\"\n")
    tool.chmod(0o755)
    assert proc.run(["./bin/hello-tool", "a"], cwd=tmp_path).stdout == "./bin/hello-tool a\n"
    env = proc.clean_env({"PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}"})
    assert proc.run(["hello-tool", "b"], env=env).stdout == f"{tool} b\n"


def test_the_child_has_a_session_of_its_own_and_default_signals() -> None:
    out = proc.run(["sh", "-c", "echo $$; ps -o sid= -p $$; grep ^SigIgn: /proc/self/status"]).stdout.split()
    pid, sid = int(out[0]), int(out[1])
    assert sid == pid != os.getsid(0)
    assert int(out[3], 16) & (1 << (signal.SIGPIPE - 1)) == 0  # SIGPIPE is not left ignored


def test_children_start_while_many_threads_run() -> None:
    stop = threading.Event()

    def busy() -> None:  # like save's index threads: mostly waiting, sometimes logging
        while not stop.wait(0.002):
            logging.getLogger("envlock.test").debug("tick")

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        outs = [proc.run([sys.executable, "-c", f"print({i})"]).stdout for i in range(10)]
    finally:
        stop.set()
    assert outs == [f"{i}\n" for i in range(10)]


@linux_only
@pytest.mark.parametrize("in_thread", [False, True])
def test_a_sigkilled_envlock_takes_its_children_with_it(in_thread: bool, tmp_path: Path) -> None:
    marker = f"envlock-proc-test-{os.getpid()}-{in_thread}"
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        from envlock import proc
        def go():
            proc.run(["sh", "-c", "echo $$ > {tmp_path}/pid; exec sleep 300 # {marker}"])
        if {in_thread}:
            t = threading.Thread(target=go); t.start(); t.join()
        else:
            go()
    """))
    host = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    pidfile = tmp_path / "pid"
    try:
        assert _wait(lambda: pidfile.is_file() and pidfile.read_text().strip()), "the child never started"
        child = int(pidfile.read_text())
        assert _alive(child)
        assert os.getsid(child) == child != host.pid  # in its own session: killpg(host) misses it
        host.kill()
        host.wait(timeout=30)
        assert _wait(lambda: not _alive(child), 30), "the child outlived the SIGKILLed envlock"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if pidfile.is_file() and pidfile.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


@linux_only
def test_a_timed_out_child_is_killed_with_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError) as err:
        proc.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=2)
    assert "timed out after 2s" in str(err.value)
    grandchild = int(pidfile.read_text())
    assert _wait(lambda: not _alive(grandchild), 30)
