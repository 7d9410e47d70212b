"""Inventory, lock building and both lock renderings; then real installs of real locks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load_localindex
from packaging.pylock import Pylock, PylockValidationError
from packaging.utils import canonicalize_name

from envlock.index.lookup import DistFile, IndexClient, LookupResult
from envlock.locking.lockfiles import LockedPackage, build_lock, render_pylock, render_requirements
from envlock.locking.reqfile import read_requirements
from envlock.settings import Settings
from envlock.worker.payload import inventory
from envlock.worker.payload.inventory import installed

if sys.version_info >= (3, 11):
    import tomllib
else:  # envlock depends on tomli below 3.11
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
PY = "3.11.7"


li = load_localindex()


def uv() -> str:
    local = Path(sys.executable).parent / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if not found:
        pytest.skip("uv is not installed")
    return found


def child_env(**extra: str) -> dict[str, str]:
    """The machine's environment minus what would point installers elsewhere.

    uv's cache stays the default one, shared with every other test and the dev venv.
    pip's config files are switched off (this machine's add a local wheel folder and file
    indexes): the lock alone must say where things come from. CA bundles stay.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UV_", "PIP_", "VIRTUAL_ENV", "PYTHONPATH", "CONDA_PREFIX"))}
    for keep in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=kw.pop("env", child_env()),
                          timeout=kw.pop("timeout", 600), **kw)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc


def freeze(python: Path) -> set[tuple[str, str]]:
    out = run(uv(), "pip", "freeze", "--python", str(python)).stdout
    return {(str(canonicalize_name(n)), v) for n, _, v in (line.partition("==") for line in out.split())}


# ---------------------------------------------------------------------------------------------
# inventory


def _dist_info(site: Path, folder: str, metadata: str, **files: str) -> Path:
    info = site / folder
    info.mkdir(parents=True)
    (info / "METADATA").write_text(metadata)
    for name, text in files.items():
        (info / name.replace("_json", ".json")).write_text(text)
    return info


@pytest.fixture
def two_sites(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    _dist_info(first, "Foo_Bar-1.0.dist-info", "Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.0\n"
               "Requires-Dist: six>=1\nRequires-Dist: pytest; extra == 'test'\n",
               INSTALLER="pip\n", REQUESTED="",
               direct_url_json=json.dumps({"url": "file:///src/foo", "dir_info": {"editable": True}}))
    # The same project again, further down the path: shadowed, as it is for import.
    _dist_info(second, "foo_bar-2.0.dist-info", "Metadata-Version: 2.1\nName: foo-bar\nVersion: 2.0\n")
    _dist_info(second, "broken-0.1.dist-info", "Metadata-Version: 2.1\nVersion: 0.1\n")
    _dist_info(second, "vcsy-1.0.dist-info", "Metadata-Version: 2.1\nName: vcsy\nVersion: 1.0\n",
               direct_url_json=json.dumps({"url": "https://github.com/o/vcsy",
                                           "vcs_info": {"vcs": "git", "commit_id": "abc123"}}))
    _dist_info(second, "remote-1.0.dist-info", "Metadata-Version: 2.1\nName: remote\nVersion: 1.0\n",
               direct_url_json=json.dumps({"url": "https://example.com/remote-1.0.tar.gz",
                                           "archive_info": {"hashes": {"sha256": "ab" * 32}}}))
    _dist_info(second, "wheelfile-1.0.dist-info", "Metadata-Version: 2.1\nName: wheelfile\nVersion: 1.0\n",
               direct_url_json=json.dumps({"url": "file:///tmp/wheelfile-1.0-py3-none-any.whl",
                                           "archive_info": {}}))
    _dist_info(second, "tree-1.0.dist-info", "Metadata-Version: 2.1\nName: tree\nVersion: 1.0\n",
               direct_url_json=json.dumps({"url": "file:///src/tree", "dir_info": {}}))
    _dist_info(second, "plain-3.0.dist-info", "Metadata-Version: 2.1\nName: Plain.Thing\nVersion: 3.0\n")
    (second / "empty-1.0.dist-info").mkdir()  # metadata lost: skipped, not an error
    egg = second / "eggy.egg-info"  # setuptools' older layout, requires.txt and all
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: eggy\nVersion: 0.5\n")
    (egg / "requires.txt").write_text("six\n[test]\npytest\n")
    return first, second


def test_inventory_first_on_path_wins_and_kinds_come_from_pep_610(two_sites: tuple[Path, Path]) -> None:
    first, second = two_sites
    found = {d["name"]: d for d in installed([str(first), str(second)])}
    # Neither "broken" (no name) nor "empty" (no metadata at all).
    assert sorted(found) == ["eggy", "foo-bar", "plain-thing", "remote", "tree", "vcsy", "wheelfile"]
    assert found["eggy"]["requires"] == ["six", 'pytest; extra == "test"']
    foo = found["foo-bar"]
    assert foo == {
        "name": "foo-bar", "version": "1.0", "installer": "pip", "requested": True,
        "direct_url": {"url": "file:///src/foo", "dir_info": {"editable": True}}, "kind": "editable",
        "requires": ["six>=1", "pytest; extra == 'test'"], "location": str(first),
        "dist_info": str(first / "Foo_Bar-1.0.dist-info"),
    }
    assert {n: d["kind"] for n, d in found.items()} == {
        "eggy": "index", "foo-bar": "editable", "plain-thing": "index", "remote": "archive", "tree": "local",
        "vcsy": "vcs", "wheelfile": "local"}
    assert found["plain-thing"]["installer"] is None and found["plain-thing"]["requested"] is False
    # The other order: the other copy wins.
    assert {d["name"]: d["version"] for d in installed([str(second), str(first)])}["foo-bar"] == "2.0"


def test_inventory_as_a_script_under_the_oldest_python(two_sites: tuple[Path, Path]) -> None:
    old = next((p for p in (Path.home() / ".pyenv/versions").glob("3.8*/bin/python3.8")), None)
    python = str(old) if old else sys.executable
    first, second = two_sites
    proc = run(python, inventory.__file__, "--path", str(first), "--path", str(second))
    assert json.loads(proc.stdout) == installed([str(first), str(second)])


def test_inventory_of_this_interpreter() -> None:
    found = {d["name"]: d for d in installed()}
    assert found["envlock"]["kind"] == "editable"
    assert found["numpy"]["kind"] == "index" and found["packaging"]["version"]
    assert all(d["name"] == canonicalize_name(d["name"]) for d in found.values())


# ---------------------------------------------------------------------------------------------
# build_lock


def _df(filename: str, digit: str) -> DistFile:
    return DistFile(filename, f"https://files.example/{filename}", digit * 64)


def _dist(name: str, version: str, requires: tuple[str, ...] = (), kind: str = "index",
          direct_url: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "version": version, "requires": list(requires), "kind": kind,
            "direct_url": direct_url, "installer": "pip", "requested": False, "location": "/site",
            "dist_info": f"/site/{name}-{version}.dist-info"}


def test_build_lock_via_markers_extras_and_kinds() -> None:
    dists = [
        _dist("a", "1", ("b>=1", "c; python_version < '3'", "d[x]", "e; extra == 'test'")),
        _dist("b", "1"),
        _dist("c", "1"),
        _dist("d", "1", ("f; extra == 'x'", "g; extra == 'y'", "h[z]; extra == 'x'")),
        _dist("e", "1"), _dist("f", "1"), _dist("g", "1"),
        _dist("h", "1", ("i; extra == 'z'",)), _dist("i", "1"),
        _dist("Envlock", "0.1", ("b",), kind="editable",
              direct_url={"url": "file:///src/envlock", "dir_info": {"editable": True}}),
        _dist("remote", "2", kind="archive",
              direct_url={"url": "https://example.com/remote-2.tar.gz",
                          "archive_info": {"hash": "sha256=" + "9" * 64}}),
    ]
    files = (_df("b-1-py3-none-any.whl", "1"),)
    pypi = "https://pypi.org/simple"
    lookups = {(d["name"], d["version"]): LookupResult(d["name"], d["version"], pypi, files)
               for d in dists if d["kind"] == "index" and d["name"] != "g"}
    lookups[("g", "1")] = LookupResult("g", "1", None, (), "offline")
    lock = build_lock(dists, lookups)
    by = {p.name: p for p in lock}
    assert [p.name for p in lock] == sorted(by) and "envlock" not in by
    assert by["b"].via == ("a",)  # not envlock: it is not in the lock
    assert by["c"].via == ()  # its marker is false here
    assert by["d"].via == ("a",)
    assert by["e"].via == ()  # a[test] was asked for by nobody
    assert by["f"].via == ("d",) and by["g"].via == ()  # d[x] asked for by a, d[y] by nobody
    assert by["h"].via == ("d",) and by["i"].via == ("h",)  # d[x] asks for h[z]
    assert by["b"].files == files and by["b"].index_url == "https://pypi.org/simple" and by["b"].locked
    assert by["g"].files == () and by["g"].error == "offline" and not by["g"].locked
    assert by["remote"].files == (DistFile("remote-2.tar.gz", "https://example.com/remote-2.tar.gz",
                                           "9" * 64),)
    assert by["a"].requires[0] == "b>=1"
    assert build_lock([_dist("x", "1")], {})[0].error == "not looked up"


# ---------------------------------------------------------------------------------------------
# render_requirements / read_requirements


def _sample() -> list[LockedPackage]:
    idx = "https://pypi.org/simple"
    return [
        LockedPackage("absl-py", "2.1.0", "index", (_df("absl_py-2.1.0.tar.gz", "b"),
                                                    _df("absl_py-2.1.0-py3-none-any.whl", "a")),
                      idx, None, (), ("keras", "tensorflow")),
        LockedPackage("keras", "3.0.0", "index", (_df("keras-3.0.0-py3-none-any.whl", "c"),), idx, None,
                      ("absl-py",), ("tensorflow",)),
        LockedPackage("mylib", "0.1", "editable", (), None,
                      {"url": "file:///src/mylib", "dir_info": {"editable": True}}, (), ()),
        LockedPackage("pip", "24.0", "index", (_df("pip-24.0-py3-none-any.whl", "e"),), idx, None, (), ()),
        LockedPackage("setuptools", "69.0.0", "index", (_df("setuptools-69.0.0-py3-none-any.whl", "f"),),
                      idx, None, (), ("tensorflow",)),
        LockedPackage("six", "1.16.0", "index", (), None, None, (), ("tensorflow",), error="offline"),
        LockedPackage("tensorflow", "2.16.1", "index", (_df("tensorflow-2.16.1-cp311-cp311-linux_x86_64.whl",
                                                            "d"),), idx, None, (), ()),
        LockedPackage("tool", "1.0", "vcs", (), None,
                      {"url": "https://tok@github.com/o/tool",
                       "vcs_info": {"vcs": "git", "commit_id": "abc"}},
                      (), ()),
    ]


EXPECTED = f"""\
#
# This file is autogenerated by pip-compile with Python 3.11
# by the following command:
#
#    envlock save model.keras
#
--index-url https://private.example/simple
--extra-index-url https://pypi.org/simple

absl-py==2.1.0 \\
    --hash=sha256:{"a" * 64} \\
    --hash=sha256:{"b" * 64}
    # via
    #   keras
    #   tensorflow
keras==3.0.0 \\
    --hash=sha256:{"c" * 64}
    # via tensorflow
# WARNING: no hash for the following package (offline).
# `pip install --require-hashes` refuses this file until it is locked again with
# the index reachable.
six==1.16.0
    # via tensorflow
tensorflow==2.16.1 \\
    --hash=sha256:{"d" * 64}

# The following packages are considered to be unsafe in a requirements file:
pip==24.0 \\
    --hash=sha256:{"e" * 64}
setuptools==69.0.0 \\
    --hash=sha256:{"f" * 64}
    # via tensorflow

# The following packages are NOT locked: they were installed from a local directory,
# an editable checkout, a VCS URL or an unhashed archive, which no index hash can pin.
# Installing from this file leaves them out (a reproducibility risk); install them
# by hand from the source shown.
#   mylib==0.1  (editable: file:///src/mylib)
#   tool==1.0  (vcs: git+https://github.com/o/tool@abc)
"""


def test_requirements_in_pip_compile_format() -> None:
    text = render_requirements(_sample(), python_version=PY, command="envlock save model.keras",
                               index_urls=["https://user:pw@private.example/simple/", "https://pypi.org/simple"])
    assert text == EXPECTED
    assert "pw" not in text and "tok" not in text
    # The default index alone is not written, as pip-compile does not.
    plain = render_requirements(_sample()[:1], python_version=PY, command="c", index_urls=["https://pypi.org/simple"])
    assert plain.splitlines()[5:7] == ["#", "absl-py==2.1.0 \\"]


def test_read_requirements_reads_what_render_wrote() -> None:
    assert read_requirements(EXPECTED) == [
        ("absl-py", "2.1.0", (f"sha256:{'a' * 64}", f"sha256:{'b' * 64}")),
        ("keras", "3.0.0", (f"sha256:{'c' * 64}",)),
        ("six", "1.16.0", ()),
        ("tensorflow", "2.16.1", (f"sha256:{'d' * 64}",)),
        ("pip", "24.0", (f"sha256:{'e' * 64}",)),
        ("setuptools", "69.0.0", (f"sha256:{'f' * 64}",)),
    ]
    remote = LockedPackage("remote", "2.0", "archive", (_df("remote-2.0.tar.gz", "9"),), None,
                           {"url": "https://files.example/remote-2.0.tar.gz", "archive_info": {}}, (), ())
    text = render_requirements([remote], python_version=PY, command="c", index_urls=[])
    assert "remote @ https://files.example/remote-2.0.tar.gz \\\n    --hash=sha256:" in text
    assert read_requirements(text) == [("remote", "2.0", (f"sha256:{'9' * 64}",))]


# ---------------------------------------------------------------------------------------------
# render_pylock


def test_pylock_validates_and_says_what_it_cannot_lock() -> None:
    pkgs = [
        *_sample(),
        LockedPackage("remote", "2.0", "archive", (_df("remote-2.0.tar.gz", "9"),), None,
                      {"url": "https://files.example/remote-2.0.tar.gz",
                       "archive_info": {"hashes": {"sha256": "9" * 64}}}, (), ()),
        LockedPackage("tree", "1.0", "local", (), None, {"url": "file:///src/tree", "dir_info": {}}, (), ()),
    ]
    text = render_pylock(pkgs, python_version=PY, created_by="envlock")
    data = tomllib.loads(text)
    lock = Pylock.from_dict(data)
    assert str(lock.lock_version) == "1.0" and lock.created_by == "envlock"
    assert str(lock.requires_python) == "==3.11.*"
    assert lock.environments and 'python_version == "3.11"' in str(lock.environments[0])
    by = {p.name: p for p in lock.packages}
    assert "six" not in by  # no hash: PEP 751 has no way to say it
    assert data["tool"]["envlock"]["not-locked"] == [
        {"name": "six", "version": "1.16.0", "kind": "index", "reason": "offline"}]
    assert [r["name"] for r in data["tool"]["envlock"]["reproducibility-risks"]] == ["mylib", "tool", "tree"]
    absl = by["absl-py"]
    assert absl.index == "https://pypi.org/simple" and absl.sdist is not None
    assert absl.sdist.hashes == {"sha256": "b" * 64}
    assert [w.name for w in absl.wheels or ()] == ["absl_py-2.1.0-py3-none-any.whl"]
    assert by["mylib"].directory is not None and by["mylib"].directory.editable
    assert by["mylib"].version is None  # a source tree: PEP 751 forbids a version
    assert by["tree"].directory is not None and by["tree"].directory.path == "/src/tree"
    assert by["tool"].vcs is not None and by["tool"].vcs.commit_id == "abc"
    assert by["tool"].vcs.url == "https://github.com/o/tool"
    assert by["remote"].archive is not None and by["remote"].archive.hashes == {"sha256": "9" * 64}


def test_pylock_validation_is_not_a_formality() -> None:
    # The validator does reject what render_pylock must never write (a package with no source).
    data = tomllib.loads(render_pylock(_sample()[:1], python_version=PY, created_by="envlock"))
    del data["packages"][0]["sdist"], data["packages"][0]["wheels"]
    with pytest.raises(PylockValidationError):
        Pylock.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Real installs: a local index, pip-compile itself, then the dev venv against PyPI


@pytest.fixture(scope="module")
def local_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[li.LocalIndex]:
    files = tmp_path_factory.mktemp("lock-index-files")
    server = li.LocalIndex()
    server.add("idx", "delta", li.Listed.of(li.build_wheel(files, "delta", "1.0")),
               li.Listed.of(li.build_sdist(files, "delta", "1.0")),
               li.Listed.of(li.build_wheel(files, "delta", "1.1")))
    server.add("idx", "gamma", li.Listed.of(li.build_wheel(files, "gamma", "1.0", requires=("delta==1.0",))),
               li.Listed.of(li.build_sdist(files, "gamma", "1.0")))
    yield server
    server.close()


def _local_lock(tmp_path: Path, server: li.LocalIndex) -> tuple[list[LockedPackage], Settings]:
    s = Settings(home=tmp_path / "home", config_dir=tmp_path / "cfg", index_url=server.url("idx"),
                 environ={"HOME": str(tmp_path)})
    dists = [_dist("gamma", "1.0", ("delta==1.0",)), _dist("delta", "1.0")]
    lookups = IndexClient(s).lookup_many((d["name"], d["version"]) for d in dists)
    return build_lock(dists, lookups), s


def test_lock_from_a_private_index_installs_from_it(tmp_path: Path, local_index: li.LocalIndex) -> None:
    lock, s = _local_lock(tmp_path, local_index)
    text = render_requirements(lock, python_version=PY, command="envlock save m.keras",
                               index_urls=s.index_urls)
    assert f"--index-url {local_index.url('idx')}\n" in text
    req = tmp_path / "requirements.lock.txt"
    req.write_text(text)
    venv = tmp_path / "venv"
    run(uv(), "venv", "-q", "--python", sys.executable, str(venv))
    run(uv(), "pip", "sync", "-q", "--require-hashes", "--python", str(venv / "bin" / "python"), str(req))
    assert freeze(venv / "bin" / "python") == {("delta", "1.0"), ("gamma", "1.0")}


def test_the_format_is_the_one_pip_compile_writes(tmp_path: Path, local_index: li.LocalIndex) -> None:
    tools = tmp_path / "pip-tools"
    run(uv(), "venv", "-q", "--python", sys.executable, str(tools))
    run(uv(), "pip", "install", "-q", "--python", str(tools / "bin" / "python"), "pip-tools", "pip")
    (tmp_path / "requirements.in").write_text("gamma==1.0\n")
    command = "envlock save model.keras"
    run(str(tools / "bin" / "pip-compile"), "-q", "--generate-hashes", "--allow-unsafe", "--no-strip-extras",
        "--index-url", local_index.url("idx"), "--output-file", "compiled.txt", "requirements.in",
        cwd=tmp_path, env=child_env(CUSTOM_COMPILE_COMMAND=command))
    theirs = (tmp_path / "compiled.txt").read_text()
    lock, s = _local_lock(tmp_path, local_index)
    ours = render_requirements(lock, python_version=f"{sys.version_info[0]}.{sys.version_info[1]}",
                               command=command, index_urls=s.index_urls)
    # The one thing envlock cannot know: which packages were asked for by a requirements.in.
    assert theirs.replace("    # via -r requirements.in\n", "") == ours


@pytest.fixture(scope="module")
def dev_lock() -> list[LockedPackage]:
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable from here")
    dists = installed()
    pins = [(d["name"], d["version"]) for d in dists if d["kind"] == "index"]
    # The session's ENVLOCK_HOME (conftest): the index cache warms once for every test.
    return build_lock(dists, IndexClient(Settings.from_env()).lookup_many(pins))


def _pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_dev_venv_every_distribution_has_a_sha256(dev_lock: list[LockedPackage]) -> None:
    names = {p.name for p in dev_lock}
    assert "envlock" not in names and {"numpy", "packaging"} <= names
    unhashed = [(p.name, p.kind, p.error) for p in dev_lock
                if not p.files and p.kind not in ("editable", "local")]
    assert unhashed == []
    for p in dev_lock:
        assert all(len(f.sha256) == 64 for f in p.files)


def test_dev_venv_lock_syncs_into_a_fresh_venv_with_uv(tmp_path: Path, dev_lock: list[LockedPackage]) -> None:
    req = tmp_path / "requirements.lock.txt"
    req.write_text(render_requirements(dev_lock, python_version=PY, command="envlock save model.keras",
                                       index_urls=["https://pypi.org/simple"]))
    venv = tmp_path / "venv"
    run(uv(), "venv", "-q", "--python", sys.executable, str(venv))
    run(uv(), "pip", "sync", "-q", "--require-hashes", "--python", str(venv / "bin" / "python"), str(req))
    assert freeze(venv / "bin" / "python") == {(p.name, p.version) for p in dev_lock if p.locked}
    assert {(n, v) for n, v, _ in read_requirements(req.read_text())} == {
        (p.name, p.version) for p in dev_lock if p.locked}


def test_dev_venv_pylock_validates_and_selects_a_file_for_every_package(
        dev_lock: list[LockedPackage]) -> None:
    python = ".".join(map(str, sys.version_info[:3]))
    text = render_pylock(dev_lock, python_version=python, created_by="envlock")
    lock = Pylock.from_dict(tomllib.loads(text))
    selected = {pkg.name: chosen for pkg, chosen in lock.select()}
    assert set(selected) == {p.name for p in dev_lock if p.locked}
    assert all(getattr(chosen, "hashes", None) for chosen in selected.values())


@pytest.mark.slow
def test_pip_installs_a_subset_with_require_hashes(tmp_path: Path, dev_lock: list[LockedPackage]) -> None:
    subset = [p for p in dev_lock if p.name in ("numpy", "packaging", "six")]
    assert len(subset) == 3
    req = tmp_path / "requirements.lock.txt"
    req.write_text(render_requirements(subset, python_version=PY, command="envlock save model.keras",
                                       index_urls=["https://pypi.org/simple"]))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
        "-r", str(req))
    got = freeze(venv / "bin" / "python")
    assert {(p.name, p.version) for p in subset} <= got
