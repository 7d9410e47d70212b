"""The environment cache, for real: uv and pip builds, renames, concurrent runs, SIGKILL, gc."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import filelock
import pytest
from conftest import load_localindex

from envlock.envs.build import BuildEvent
from envlock.envs.cache import MARKER, EnvCache
from envlock.envs.inventory import compare_inventory, inventory, satisfies
from envlock.envs.key import EnvSpec, canonical_lock, lock_key
from envlock.errors import CommandError
from envlock.locking.reqfile import all_hashed, locked_pins
from envlock.settings import Settings

DATA = Path(__file__).resolve().parent / "data"
SMALL_LOCK = DATA / "small.lock.txt"
PY = platform.python_version()
SIX_HASHES = (
    "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274",
    "ff70335d468e7eb6ec65b95b99d3a2836546063f63acc5171de367e834932a81",
)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ENVLOCK_HOME", str(tmp_path / "home"))
    return Settings.from_env()


@pytest.fixture
def cache(settings: Settings) -> EnvCache:
    return EnvCache(settings)


def _out(argv: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd).stdout.strip()


def _leftovers(cache: EnvCache) -> list[str]:
    if not cache.root.is_dir():
        return []
    return sorted(p.name for p in cache.root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


# --- a local wheel with a console script (the part of a venv that holds its own path) -----------


def build_wheel(folder: Path, name: str = "demo_tool", version: str = "1.0") -> tuple[Path, str]:
    """A real, minimal wheel whose console script prints ``sys.prefix``; returns it and its sha256."""
    script = name.replace("_", "-")
    wheel = load_localindex().write_wheel(
        folder, script, version, {f"{name}.py": "import sys\n\ndef main():\n    print(sys.prefix)\n"},
        metadata={"entry_points.txt": f"[console_scripts]\n{script} = {name}:main\n"})
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def wheelhouse(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with the demo wheel and a hashed lock for it."""
    wheel, sha = build_wheel(tmp_path / "wheels")
    lock = tmp_path / "demo.lock.txt"
    lock.write_text(f"demo-tool==1.0 \\\n    --hash=sha256:{sha}\n")
    return wheel.parent, lock


# --- the key ------------------------------------------------------------------------------------


def test_lock_key_ignores_form_but_not_content() -> None:
    text = SMALL_LOCK.read_text()
    base = lock_key(text, "3.11.7", "linux-x86_64")
    same = textwrap.dedent(f"""\
        --index-url https://example.org/simple
        # reordered, one line each, other case, hashes swapped, a comment
        Six==1.17.0 --hash=sha256:{SIX_HASHES[1].upper()} --hash=sha256:{SIX_HASHES[0]}  # why
        packaging==25.0 \\
            --hash=sha256:d443872c98d677bf60f6a1f2f8c1cb748e8fe762d2bf9d3148b5599295b0fc4f \\
            --hash=sha256:29572ef2b1f17581046b3a2227d5c611fb25ec70ca1ba8554b24b0e69331a484

        """)
    assert lock_key(same, "3.11.7", "linux-x86_64") == base
    assert len(base) == 64 and int(base, 16) >= 0
    assert lock_key(text, "3.11.8", "linux-x86_64") != base
    assert lock_key(text, "3.11.7", "macosx-14.0-arm64") != base
    assert lock_key(text.replace("six==1.17.0", "six==1.16.0"), "3.11.7", "linux-x86_64") != base
    one_hash_less = text.replace(f"    --hash=sha256:{SIX_HASHES[1]}", "").replace(
        f"{SIX_HASHES[0]} \\", SIX_HASHES[0])
    assert canonical_lock(one_hash_less) != canonical_lock(text)
    assert lock_key(one_hash_less, "3.11.7", "linux-x86_64") != base


def test_lock_helpers() -> None:
    text = SMALL_LOCK.read_text()
    assert all_hashed(text)
    assert not all_hashed(text + "numpy==2.0.0\n")
    assert not all_hashed("# nothing\n")
    assert locked_pins(text) == {"packaging": "25.0", "six": "1.17.0"}


def test_path_for_rejects_keys_that_are_not_names(cache: EnvCache) -> None:
    for bad in ("", "../x", ".tmp-a", "a/b", "a.lock"):
        with pytest.raises(ValueError):
            cache.path_for(bad)


# --- building and finding ----------------------------------------------------------------------


def test_cold_build_then_warm_ensure(cache: EnvCache) -> None:
    spec = EnvSpec.from_lock(SMALL_LOCK, PY)
    assert spec.require_hashes
    assert cache.find(spec.key) is None
    events: list[BuildEvent] = []
    t0 = time.perf_counter()
    env = cache.ensure(spec, progress=events.append)
    cold = time.perf_counter() - t0
    assert env.built and env.path == cache.path_for(spec.key)
    assert [e.stage for e in events if e.stage != "output"] == ["interpreter", "venv", "install", "done"]
    assert _out([str(env.python), "-c", "import six, packaging, sys; "
                 "print(six.__version__, packaging.__version__, sys.prefix)"]) \
        == f"1.17.0 25.0 {env.path}"
    marker = json.loads((env.path / MARKER).read_text())
    assert marker["key"] == spec.key and marker["python"] == PY
    # The size is measured on first need (cache list, gc), not during the build.
    assert [i.size > 0 for i in cache.list() if i.key == spec.key] == [True]
    assert {"created", "last_used"} <= marker.keys()
    assert cache.find(spec.key) == env
    assert _leftovers(cache) == []

    # Warm: nothing runs, nothing is emitted, well under 50 ms; last use is recorded.
    warm_events: list[BuildEvent] = []
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        again = cache.ensure(spec, progress=warm_events.append)
        times.append(time.perf_counter() - t0)
    assert again == env and not again.built
    assert warm_events == []
    assert statistics.median(times) < 0.050, times
    assert json.loads((env.path / MARKER).read_text())["last_used"] >= marker["last_used"]
    print(f"cold build {cold:.2f}s, warm ensure median {statistics.median(times) * 1000:.2f} ms")


def test_another_python_version_is_another_environment(cache: EnvCache) -> None:
    pyenv_312 = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions" / "3.12.1"
    if not pyenv_312.is_dir():
        pytest.skip("pyenv has no 3.12.1 here")
    a = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, PY))
    b = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, "3.12.1"))
    assert a.key != b.key
    assert _out([str(b.python), "-c", "import platform; print(platform.python_version())"]) == "3.12.1"
    assert {i.key for i in cache.list()} == {a.key, b.key}


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_renamed_environment_works_scripts_included(settings: Settings, installer: str,
                                                    wheelhouse: tuple[Path, Path]) -> None:
    wheels, lock = wheelhouse
    cache = EnvCache(settings, installer=installer)
    spec = EnvSpec.from_lock(lock, PY, find_links=[wheels], no_index=True)
    env = cache.ensure(spec)
    assert env.built
    marker = json.loads((env.path / MARKER).read_text())
    assert marker["installer"].startswith(installer + " ")
    # Built under .tmp-<key>-<random>, then renamed: the console script and the activation
    # script must find the final folder, and no file in bin/ may name the temporary one.
    assert _out([str(env.path / "bin" / "demo-tool")]) == str(env.path)
    activated = _out(["bash", "-c", 'source bin/activate && echo "$VIRTUAL_ENV"'], cwd=env.path)
    assert Path(activated).resolve() == env.path.resolve()
    for f in [*(env.path / "bin").iterdir(), env.path / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            assert b".tmp-" not in f.read_bytes(), f
    # Exactly the lock: no pip, setuptools or wheel seeded into it.
    assert {n for n in inventory(env.python)} == {"demo-tool"}


def test_pip_fallback_installs_a_hashed_lock_from_the_index(settings: Settings) -> None:
    cache = EnvCache(settings, installer="pip")
    env = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, PY))
    assert inventory(env.python) == {"packaging": "25.0", "six": "1.17.0"}
    assert satisfies(env.python, locked_pins(SMALL_LOCK.read_text()))


def test_pip_fallback_with_an_old_pip_seeds_then_removes_it(settings: Settings, tmp_path: Path) -> None:
    # pip < 22.3 cannot install into another interpreter's environment (--python): the venv
    # gets pip seeded, installs the lock with it, and drops what the lock does not name.
    old = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions" / "3.7.16"
    if not (old / "bin" / "python3.7").exists():
        pytest.skip("pyenv has no 3.7.16 (with pip 22.0) here")
    cache = EnvCache(settings, installer="pip")
    env = cache.ensure(EnvSpec.from_lock(_six_only(tmp_path), "3.7.16"))
    assert json.loads((env.path / MARKER).read_text())["installer"].startswith("pip 22.")
    site = env.path / "lib" / "python3.7" / "site-packages"
    assert sorted(p.name for p in site.glob("*.dist-info")) == ["six-1.17.0.dist-info"]
    assert _out([str(env.python), "-c", "import six; print(six.__version__)"]) == "1.17.0"


def test_a_failed_build_leaves_nothing(cache: EnvCache, tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock.txt"
    bad.write_text("six==1.17.0 --hash=sha256:" + "0" * 64 + "\n")
    spec = EnvSpec.from_lock(bad, PY)
    with pytest.raises(CommandError) as info:
        cache.ensure(spec)
    assert info.value.exit_code == 3
    assert cache.find(spec.key) is None
    assert not cache.path_for(spec.key).exists()
    assert _leftovers(cache) == []


def test_interrupted_build_leaves_nothing(cache: EnvCache) -> None:
    spec = EnvSpec.from_lock(SMALL_LOCK, PY)

    def interrupt(event: BuildEvent) -> None:
        if event.stage == "install":  # the venv exists in its temporary folder by now
            assert len(_leftovers(cache)) == 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.ensure(spec, progress=interrupt)
    assert _leftovers(cache) == []
    assert cache.find(spec.key) is None
    assert cache.ensure(spec).built  # and the lock was released


def test_a_folder_without_marker_is_rebuilt(cache: EnvCache) -> None:
    spec = EnvSpec.from_lock(SMALL_LOCK, PY)
    half = cache.path_for(spec.key)
    (half / "lib").mkdir(parents=True)
    (half / "bin").mkdir()
    (half / "bin" / "python").symlink_to(sys.executable)
    assert cache.find(spec.key) is None
    events: list[BuildEvent] = []
    env = cache.ensure(spec, progress=events.append)
    assert env.built and (env.path / MARKER).is_file()
    assert any(e.stage == "cleanup" for e in events)
    assert _leftovers(cache) == []


def test_an_environment_whose_base_interpreter_is_gone_is_rebuilt(cache: EnvCache) -> None:
    spec = EnvSpec.from_lock(SMALL_LOCK, PY)
    env = cache.ensure(spec)
    env.python.unlink()
    env.python.symlink_to(env.path / "no-such-python")
    assert cache.find(spec.key) is None
    rebuilt = cache.ensure(spec)
    assert rebuilt.built
    assert _out([str(rebuilt.python), "-c", "import six; print(six.__version__)"]) == "1.17.0"


# --- real concurrency, real kills --------------------------------------------------------------

CHILD = textwrap.dedent("""\
    import json, signal, sys, time
    from pathlib import Path
    from envlock.envs.cache import EnvCache

    # Ctrl-C as in a terminal: a non-interactive shell starts background jobs (CI run with `&`)
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from envlock.envs.key import EnvSpec
    from envlock.settings import Settings

    lock, python, links, go = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    while go and not Path(go).exists():
        time.sleep(0.002)
    spec = EnvSpec.from_lock(Path(lock), python, find_links=[links] if links else [],
                             no_index=bool(links))
    stages = []
    def progress(event):
        stages.append(event.stage)
        print(json.dumps({"event": event.stage, "message": event.message}), flush=True)
    env = EnvCache(Settings.from_env()).ensure(spec, progress=progress)
    print(json.dumps({"path": str(env.path), "built": env.built, "stages": stages}), flush=True)
    """)


def _child(tmp_path: Path, lock: Path, *, links: str = "", go: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    if not script.exists():  # rewriting it under a starting sibling would hand it an empty file
        script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(lock), PY, links, str(go or "")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def test_four_concurrent_runs_build_once(cache: EnvCache, tmp_path: Path) -> None:
    go = tmp_path / "go"
    children = [_child(tmp_path, SMALL_LOCK, go=go) for _ in range(4)]
    time.sleep(1.0)  # let all four import envlock and wait at the barrier
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["built"] for r in results) == 1
    assert sum(r["stages"].count("venv") for r in results) == 1  # one venv was ever created
    assert len({r["path"] for r in results}) == 1
    waited = sum("wait" in r["stages"] for r in results)
    assert waited >= 1  # the others did wait for the lock rather than racing past it
    assert _leftovers(cache) == []
    assert [i.path for i in cache.list()] == [Path(results[0]["path"])]


class StallingIndex:
    """A find-links page on localhost whose first wheel download hangs until released.

    Holds a build inside ``uv pip sync`` for as long as a test needs, with no timing guesses.
    """

    def __init__(self, wheel: Path, sha: str) -> None:
        self.requested = threading.Event()
        self.release = threading.Event()
        self._first = True
        index = self
        page = f'<a href="{wheel.name}#sha256={sha}">{wheel.name}</a>\n'.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0].endswith(".whl"):
                    if index._first:
                        index._first = False
                        index.requested.set()
                        index.release.wait(120)
                    body = wheel.read_bytes()
                    ctype = "application/octet-stream"
                else:
                    body, ctype = page, "text/html"
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client was killed

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[tuple[StallingIndex, Path]]:
    # A wheel that is new to uv's shared cache (its URL has a fresh port), so uv must download it.
    wheel, sha = build_wheel(tmp_path / "served")
    lock = tmp_path / "served.lock.txt"
    lock.write_text(f"demo-tool==1.0 --hash=sha256:{sha}\n")
    index = StallingIndex(wheel, sha)
    yield index, lock
    index.close()


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the uv that a killed build left running)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def _kill_during_sync(cache: EnvCache, tmp_path: Path, index: StallingIndex, lock: Path, *,
                      child_env: dict[str, str] | None = None) -> tuple[Path, list[int]]:
    """Start a build in a child, wait until its `uv pip sync` is downloading, SIGKILL the child.

    Returns the temporary folder it left and the pids of its uv, which (started in its own
    session by envlock.proc) outlives it.
    """
    spec = EnvSpec.from_lock(lock, PY, find_links=[index.url], no_index=True)
    child = _child(tmp_path, lock, links=index.url, env=child_env)
    try:
        assert index.requested.wait(120), "uv never asked for the wheel"
        tmp_dirs = list(cache.root.glob(f".tmp-{spec.key}-*"))
        assert len(tmp_dirs) == 1 and (tmp_dirs[0] / "pyvenv.cfg").is_file()
        uv_pids = [p for p in _processes_mentioning(str(tmp_dirs[0])) if p != child.pid]
        assert uv_pids, "uv pip sync should be running right now"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert tmp_dirs[0].exists()  # what a killed build leaves behind...
    assert cache.find(spec.key) is None  # ...never looks complete
    return tmp_dirs[0], uv_pids


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@linux_only
def test_sigkill_during_uv_sync_then_next_ensure_builds_cleanly(
        cache: EnvCache, tmp_path: Path, stalling: tuple[StallingIndex, Path]) -> None:
    index, lock = stalling
    leftover, uv_pids = _kill_during_sync(cache, tmp_path, index, lock)
    _kill_pids(uv_pids)  # the whole build dies, as it would with its process tree
    spec = EnvSpec.from_lock(lock, PY, find_links=[index.url], no_index=True)
    events: list[BuildEvent] = []
    env = cache.ensure(spec, progress=events.append)
    assert env.built
    assert [e.message for e in events if e.stage == "cleanup"] == [f"removing leftover {leftover}"]
    assert not leftover.exists()
    assert _leftovers(cache) == []
    assert _out([str(env.path / "bin" / "demo-tool")]) == str(env.path)


@linux_only
def test_sigkill_with_its_uv_left_running(
        cache: EnvCache, tmp_path: Path, stalling: tuple[StallingIndex, Path]) -> None:
    # Only the envlock process dies; its uv keeps going (here: times out after 2 s, retries,
    # gets the wheel) and writes into the temporary folder, even after it was removed.
    index, lock = stalling
    leftover, uv_pids = _kill_during_sync(cache, tmp_path, index, lock,
                                          child_env={"UV_HTTP_TIMEOUT": "2"})
    try:
        spec = EnvSpec.from_lock(lock, PY, find_links=[index.url], no_index=True)
        env = cache.ensure(spec)
        assert env.built
        assert _out([str(env.path / "bin" / "demo-tool")]) == str(env.path)
        deadline = time.monotonic() + 60
        while _processes_mentioning(str(leftover)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_mentioning(str(leftover))
    finally:
        _kill_pids(uv_pids)
    # Whatever the orphan wrote is a .tmp- folder without marker: never used, removed by gc.
    assert cache.find(spec.key) == env
    cache.gc()
    assert _leftovers(cache) == []
    assert _out([str(env.path / "bin" / "demo-tool")]) == str(env.path)


@linux_only
def test_ctrl_c_during_uv_sync_cleans_up_at_once(
        cache: EnvCache, tmp_path: Path, stalling: tuple[StallingIndex, Path]) -> None:
    index, lock = stalling
    spec = EnvSpec.from_lock(lock, PY, find_links=[index.url], no_index=True)
    child = _child(tmp_path, lock, links=index.url)
    try:
        assert index.requested.wait(120)
        tmp_dir = next(cache.root.glob(f".tmp-{spec.key}-*"))
        assert _processes_mentioning(str(tmp_dir))
        os.kill(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert child.returncode != 0 and "KeyboardInterrupt" in err
        assert _leftovers(cache) == []
        assert not cache.path_for(spec.key).exists()
        assert _processes_mentioning(str(tmp_dir)) == []  # uv was killed with it
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- gc and list --------------------------------------------------------------------------------


def _age(cache: EnvCache, key: str, days: float) -> None:
    marker = cache.path_for(key) / MARKER
    doc = json.loads(marker.read_text())
    doc["last_used"] = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
    marker.write_text(json.dumps(doc))


def _six_only(tmp_path: Path) -> Path:
    lock = tmp_path / "six.lock.txt"
    lock.write_text("six==1.17.0 " + " ".join(f"--hash=sha256:{h}" for h in SIX_HASHES) + "\n")
    return lock


def test_gc_by_age_then_by_size_oldest_first(cache: EnvCache, tmp_path: Path) -> None:
    small = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, PY))
    six = cache.ensure(EnvSpec.from_lock(_six_only(tmp_path), PY))
    _age(cache, six.key, 30)
    _age(cache, small.key, 3)
    assert [i.key for i in cache.list()] == [small.key, six.key]  # most recent first

    assert cache.gc(older_than=timedelta(days=365)) == []
    removed = cache.gc(older_than=timedelta(days=7))
    assert [(r.key, r.reason) for r in removed] == [(six.key, "age")]
    assert not six.path.exists() and small.path.exists()

    again = cache.ensure(EnvSpec.from_lock(_six_only(tmp_path), PY))  # now the newest
    infos = {i.key: i for i in cache.list()}
    total = sum(i.size for i in infos.values())
    removed = cache.gc(max_total_bytes=total - 1)
    assert [(r.key, r.reason) for r in removed] == [(small.key, "size")]
    assert again.path.exists()
    assert _leftovers(cache) == []


def test_gc_never_removes_what_another_process_holds(cache: EnvCache, tmp_path: Path) -> None:
    env = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, PY))
    _age(cache, env.key, 30)
    dead = cache.root / f".tmp-{env.key}-deadbeef"
    (dead / "lib").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(120)", str(cache.root / f"{env.key}.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert cache.gc(older_than=timedelta(days=1), max_total_bytes=0) == []
        assert env.path.exists() and dead.exists()
    finally:
        holder.kill()
        holder.wait()
    removed = cache.gc(older_than=timedelta(days=1))
    assert sorted((r.reason, r.path.name) for r in removed) == [("age", env.key), ("partial", dead.name)]
    assert list(cache.root.iterdir()) == [cache.root / f"{env.key}.lock"]


def test_gc_and_list_on_an_empty_cache(cache: EnvCache) -> None:
    assert cache.list() == []
    assert cache.gc(older_than=timedelta(0), max_total_bytes=0) == []


def test_gc_waits_for_nobody_and_ensure_waits_for_gc(cache: EnvCache) -> None:
    # A held lock makes ensure wait (reporting it) rather than build alongside.
    spec = EnvSpec.from_lock(SMALL_LOCK, PY)
    cache.ensure(spec)
    lock = filelock.FileLock(str(cache.root / f"{spec.key}.lock"))
    lock.acquire()
    events: list[BuildEvent] = []
    done = threading.Event()

    def run() -> None:
        cache.ensure(spec, progress=events.append)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    assert not done.is_set() and [e.stage for e in events] == ["wait"]
    lock.release()
    t.join(30)
    assert done.is_set()


# --- does an environment already satisfy the lock? ---------------------------------------------


def test_satisfies(cache: EnvCache) -> None:
    env = cache.ensure(EnvSpec.from_lock(SMALL_LOCK, PY))
    pins = locked_pins(SMALL_LOCK.read_text())
    assert satisfies(env.python, pins)
    assert not satisfies(env.python, {**pins, "six": "1.16.0"})
    assert not satisfies(env.python, {"six": "1.17.0"})  # packaging is extra
    assert satisfies(env.python, {"six": "1.17.0"}, ignore=["packaging"])
    # This test's own environment has much more than two distributions.
    assert not satisfies(Path(sys.executable), pins)


def test_compare_inventory() -> None:
    diff = compare_inventory({"six": "1.17.0", "numpy": "2.0.0", "extra-thing": "1"},
                             {"Six": "1.17.0", "numpy": "2.0", "packaging": "25.0"})
    assert diff.missing == {"packaging": "25.0"}
    assert diff.different == {"numpy": ("2.0", "2.0.0")}
    assert diff.extra == {"extra-thing": "1"}
    assert not diff.ok
    assert compare_inventory({"six": "1.17.0"}, {"six": "1.17.0"}).ok


# --- a real TensorFlow environment ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.tf
def test_tensorflow_environment_from_a_hashed_lock(cache: EnvCache, tmp_path: Path) -> None:
    """The case envlock exists for: with uv's cache warm, a TensorFlow env builds in seconds."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from envlock.tools.uv import find_uv

    try:
        tf_dist = next(n for n in ("tensorflow-cpu", "tensorflow") if _has_dist(n))
        pins = {n: dist_version(n) for n in (tf_dist, "keras", "numpy")}
    except (StopIteration, PackageNotFoundError):
        pytest.skip("TensorFlow is not installed here")
    uv = str(find_uv(None))
    # Hash every pin the way `envlock save` does, constrained to this environment's versions.
    freeze = _out([uv, "pip", "freeze", "--python", sys.executable])
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(ln for ln in freeze.splitlines() if "==" in ln) + "\n")
    wanted = tmp_path / "in.txt"
    wanted.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    lock = tmp_path / "tf.lock.txt"
    _out([uv, "pip", "compile", "-q", "--no-config", "--generate-hashes", "--python", sys.executable,
          str(wanted), "-c", str(constraints), "-o", str(lock)])

    spec = EnvSpec.from_lock(lock, PY)
    assert spec.require_hashes
    t0 = time.perf_counter()
    env = cache.ensure(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert not cache.ensure(spec).built
    warm = time.perf_counter() - t0
    print(f"TensorFlow env: cold build {cold:.2f}s, warm ensure {warm * 1000:.2f} ms")
    assert warm < 0.050
    got = _out([str(env.python), "-c", f"from importlib.metadata import version; "
                f"import tensorflow, keras; print(version({tf_dist!r}), keras.__version__)"])
    assert got == f"{pins[tf_dist]} {pins['keras']}"
    assert inventory(env.python) == locked_pins(lock.read_text())


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True
