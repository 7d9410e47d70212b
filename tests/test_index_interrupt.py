"""Ctrl-C and SIGTERM during `envlock save` while index look-ups hang: prompt, nothing written.

The index is a local server that accepts connections and never answers, so every look-up is
in flight for ENVLOCK_HTTP_TIMEOUT (60 s here). A save that joined its look-up threads would
take that long to stop; one that leaves them behind stops in about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HTTP_TIMEOUT = 60.0
PROMPT = 20.0  # well under HTTP_TIMEOUT even on a loaded 2-core machine


class SilentIndex:
    """Accepts connections, records them, and never reads or writes a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/simple"
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by close()
                return
            self.held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent_index() -> Iterator[SilentIndex]:
    server = SilentIndex()
    yield server
    server.close()


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_save_is_prompt_while_lookups_hang(tiny_project: Path, tmp_path: Path,
                                                           silent_index: SilentIndex, sig: int,
                                                           code: int) -> None:
    folder = tmp_path / "project"
    shutil.copytree(tiny_project, folder, ignore=shutil.ignore_patterns("*.envlock", "__pycache__"))
    before = _snapshot(folder)
    env = {k: v for k, v in os.environ.items()
           if k not in ("UV_DEFAULT_INDEX", "PIP_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX",
                        "PIP_EXTRA_INDEX_URL")}
    env.update({"ENVLOCK_HOME": str(tmp_path / "home"), "UV_INDEX_URL": silent_index.url,
                "ENVLOCK_HTTP_TIMEOUT": str(HTTP_TIMEOUT), "NO_PROXY": "*", "no_proxy": "*"})
    proc = subprocess.Popen([sys.executable, "-m", "envlock", "save", "model.keras"], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert silent_index.accepted.wait(120), "save never asked the index"
        time.sleep(0.5)  # the other look-ups are in flight too
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=HTTP_TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            pytest.fail("save did not stop at all")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert took < PROMPT, f"save took {took:.1f}s to stop (it waited for the look-ups)"
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("envlock: error:")] == lines[-1:], err
    assert "Traceback" not in err
    assert _snapshot(folder) == before
    print(f"\nstopped {took:.2f}s after {signal.Signals(sig).name}")
