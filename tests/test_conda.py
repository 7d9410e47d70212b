"""Conda environments (issue 5): capture from conda-meta, conda-lock.yml, rebuild, exports.

Conda channels are out of reach here, so a session fixture builds a small local ``file://``
channel of real conda packages (``.tar.bz2`` archives with ``info/index.json``,
``info/paths.json`` and files) and indexes it with py-rattler:

* ``python``: packed from the CPython install the tests run on (CPython finds its standard
  library relative to its executable). Its ELF run paths are rewritten to ``$ORIGIN`` so the
  prefix is self-contained, and the text files that name the build prefix are declared with a
  prefix placeholder, which the installer rewrites, as conda-forge's python does;
* ``tomli-w``: a ``noarch: python`` package made from the wheel files installed in this venv.
  envlock needs tomli-w, so pip finds it satisfied by conda's copy: the test of "a dist-info
  listed in a conda record is conda's, not pip's".

A source environment is created from that channel (py-rattler solve + install), envlock with
TensorFlow goes in on top through uv (the pip part), a tiny model is trained and saved with
``envlock save`` run by the environment's own python. Everything after that uses the sidecar.

Needs the ``conda`` extra (py-rattler). conda-lock's own parser runs from a tool venv that the
``conda_lock_exe`` fixture finds (``ENVLOCK_CONDA_LOCK``, PATH) or installs with uv once into
pytest's cache folder, the way a user installs it with pipx.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rattler
from conftest import PROJECTS, run_cli
from rattler.explicit_environment import ExplicitEnvironmentSpec
from rattler.index import index_fs

from envlock.envs.conda import CondaSpec, installed_records, pip_requirements, records_differ
from envlock.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, SidecarError, ToolNotFoundError
from envlock.locking import condalock, condarender
from envlock.locking.condalock import CondaLock, CondaPackage, PipPackage
from envlock.locking.condayaml import dump_yaml, load_yaml
from envlock.sidecar.store import MANIFEST, read_sidecar, write_sidecar
from envlock.tools import conda as conda_tool
from envlock.tools.uv import find_uv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"
PLATFORM = condalock.this_platform()
pytestmark = pytest.mark.skipif(PLATFORM != "linux-64", reason="the local channel packs a linux-64 CPython")


# --- building real conda packages --------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(out: Path, index: dict[str, Any], files: list[tuple[str, bytes | str, int]], *,
                  placeholders: dict[str, str] | None = None, link: dict[str, Any] | None = None) -> Path:
    """A conda ``.tar.bz2``: ``files`` are (path, bytes or a symlink target as str, mode)."""
    placeholders = placeholders or {}
    paths = []
    with tarfile.open(out, "w:bz2", compresslevel=1) as tf:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tf.addfile(info, io.BytesIO(data))

        for rel, data, mode in files:
            if isinstance(data, str):
                info = tarfile.TarInfo(rel)
                info.type, info.linkname, info.mtime = tarfile.SYMTYPE, data, 0
                tf.addfile(info)
                paths.append({"_path": rel, "path_type": "softlink", "sha256": _sha256(data.encode()),
                              "size_in_bytes": len(data)})
                continue
            add(rel, data, mode)
            entry: dict[str, Any] = {"_path": rel, "path_type": "hardlink", "sha256": _sha256(data),
                                     "size_in_bytes": len(data)}
            if rel in placeholders:
                entry.update(prefix_placeholder=placeholders[rel], file_mode="text")
            paths.append(entry)
        add("info/index.json", json.dumps(index, indent=2).encode())
        add("info/paths.json", json.dumps({"paths": paths, "paths_version": 1}, indent=2).encode())
        add("info/files", "".join(p["_path"] + "\n" for p in paths).encode())
        if link:
            add("info/link.json", json.dumps(link).encode())
    return out


_SKIP_DIRS = {"test", "tests", "__pycache__", "site-packages", "idlelib", "tkinter", "turtledemo",
              "ensurepip", "lib2to3"}


def _cpython_install() -> Path:
    """A standalone CPython install of the running version: the venv's base, or pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()
    for cand in (Path(sys.base_prefix), pyenv / "versions" / platform.python_version()):
        if (str(cand) not in ("/usr", "/usr/local") and (cand / "bin" / f"python{MINOR}").is_file()
                and (cand / "lib" / f"python{MINOR}" / "os.py").is_file()):
            return cand.resolve()
    pytest.skip(f"no standalone CPython {platform.python_version()} install to pack as a conda package")


def python_files(prefix: Path) -> tuple[list[tuple[str, bytes | str, int]], dict[str, str]]:
    """The files of a CPython install as a conda package holds them, and the text files that
    name its build prefix (declared as prefix placeholders)."""
    picked = [prefix / "bin" / n for n in (f"python{MINOR}", "python3", "python", f"python{MINOR}-config",
                                           "python3-config") if (prefix / "bin" / n).exists()]
    picked += [p for p in (prefix / "lib").iterdir() if p.name.startswith("libpython")]
    picked += sorted((prefix / "lib" / "pkgconfig").glob("*.pc"))
    for root in (prefix / "lib" / f"python{MINOR}", prefix / "include"):
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-")]
            picked += [Path(dirpath) / n for n in names]
    site = prefix / "lib" / f"python{MINOR}" / "site-packages" / "README.txt"
    if site.is_file():
        picked.append(site)
    old_lib = f"{prefix}/lib".encode() + b"\0"
    files: list[tuple[str, bytes | str, int]] = []
    placeholders: dict[str, str] = {}
    for p in sorted(set(picked)):
        rel = p.relative_to(prefix).as_posix()
        if p.is_symlink():
            files.append((rel, os.readlink(p), 0o777))
            continue
        data = p.read_bytes()
        if data[:4] == b"\x7fELF":
            # RUNPATH <prefix>/lib becomes relative to the file, padded in place (same length).
            depth = rel.count("/")
            new = b"$ORIGIN/../lib" if rel.startswith("bin/") else b"$ORIGIN" + b"/.." * (depth - 1)
            data = data.replace(old_lib, new + b"\0" * (len(old_lib) - len(new)))
        elif str(prefix).encode() in data:
            placeholders[rel] = str(prefix)
        files.append((rel, data, p.stat().st_mode & 0o777))
    return files, placeholders


def _index_json(name: str, version: str, build: str, subdir: str, depends: list[str],
                **extra: Any) -> dict[str, Any]:
    doc = {"name": name, "version": version, "build": build, "build_number": 0, "depends": depends,
           "subdir": subdir, "license": "MIT", "timestamp": 1700000000000, **extra}
    return doc


def build_channel(channel: Path) -> dict[str, Path]:
    (channel / PLATFORM).mkdir(parents=True, exist_ok=True)
    (channel / "noarch").mkdir(exist_ok=True)
    built: dict[str, Path] = {}
    cpython = _cpython_install()
    files, placeholders = python_files(cpython)
    version = platform.python_version()
    build = "h0_envlock_cpython"
    built["python"] = write_package(
        channel / PLATFORM / f"python-{version}-{build}.tar.bz2",
        _index_json("python", version, build, PLATFORM, ["__glibc >=2.17"], arch="x86_64",
                    platform="linux", license="Python-2.0"),
        files, placeholders=placeholders)
    dist = metadata.distribution("tomli-w")
    tfiles: list[tuple[str, bytes | str, int]] = []
    for f in dist.files or ():
        s = str(f)
        if "__pycache__" in s or s.endswith(("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
            continue
        tfiles.append((f"site-packages/{s}", Path(str(dist.locate_file(f))).read_bytes(), 0o644))
    info = next(s for s in (str(f) for f in dist.files or ()) if s.endswith(".dist-info/METADATA"))
    tfiles.append((f"site-packages/{info.rsplit('/', 1)[0]}/INSTALLER", b"conda\n", 0o644))
    tv = dist.version
    built["tomli-w"] = write_package(
        channel / "noarch" / f"tomli-w-{tv}-pyh0_envlock.tar.bz2",
        _index_json("tomli-w", tv, "pyh0_envlock", "noarch", ["python >=3.9"], noarch="python"),
        tfiles, link={"noarch": {"type": "python"}, "package_metadata_version": 1})
    asyncio.run(index_fs(channel, write_zst=False, write_shards=False))
    return built


# --- session fixtures ------------------------------------------------------------------------


def _sh(argv: list[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def conda_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    channel = tmp_path_factory.mktemp("conda") / "channel"
    build_channel(channel)
    return channel


@pytest.fixture(scope="session")
def conda_source_env(conda_channel: Path) -> Path:
    """A conda environment from the local channel, with envlock and TensorFlow pip-installed on top."""
    prefix = conda_channel.parent / "source-env"
    records = asyncio.run(rattler.solve([conda_channel.as_uri()], [f"python =={platform.python_version()}",
                                                                   "tomli-w"],
                                        platforms=[PLATFORM, "noarch"],
                                        virtual_packages=rattler.VirtualPackage.detect()))
    asyncio.run(rattler.install(records, prefix, show_progress=False))
    uv = find_uv()
    freeze = _sh([uv, "pip", "freeze", "--python", sys.executable]).stdout
    constraints = conda_channel.parent / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in freeze.splitlines()
                                   if line and not line.startswith(("-e", "envlock", "py-rattler"))))
    _sh([uv, "pip", "install", "--python", prefix / "bin" / "python", "-e", f"{ROOT}[tensorflow]",
         "-c", constraints])
    return prefix


@pytest.fixture(scope="session")
def conda_model(conda_source_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny's model trained in the conda environment and saved there by `envlock save`."""
    project = tmp_path_factory.mktemp("conda-tiny")
    for f in (PROJECTS / "tiny").iterdir():
        if f.is_file():
            shutil.copy(f, project / f.name)
    python = conda_source_env / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    _sh([python, "train.py", "model.keras"], cwd=project, env=env)
    _sh([python, "-m", "envlock", "save", "model.keras"], cwd=project, env=env)
    return project / "model.keras"


@pytest.fixture(scope="session")
def conda_lock_exe(pytestconfig: pytest.Config) -> Path:
    """conda-lock, installed on its own (never into envlock's environment)."""
    try:
        return conda_tool.find_conda_lock()
    except ToolNotFoundError:
        pass
    venv = Path(pytestconfig.cache.mkdir("conda-lock-tool"))  # type: ignore[union-attr]
    exe = venv / "bin" / "conda-lock"
    if not exe.is_file():
        uv = find_uv()
        _sh([uv, "venv", "--clear", "--python", sys.executable, venv])
        _sh([uv, "pip", "install", "--python", venv / "bin" / "python", "conda-lock>=2.5"])
    return exe


# --- pure functions --------------------------------------------------------------------------


def _lock(platform_: str = PLATFORM) -> CondaLock:
    py = CondaPackage("python", "3.11.7", "h0", f"https://conda.anaconda.org/conda-forge/{platform_}/"
                      "python-3.11.7-h0.conda", "a" * 32, "b" * 64, ("libzlib >=1.2.13,<2.0a0", "tzdata"),
                      {"fn": "python-3.11.7-h0.conda", "subdir": platform_})
    z = CondaPackage("libzlib", "1.3.1", "hb9d3cd8_2", f"https://conda.anaconda.org/conda-forge/{platform_}/"
                     "libzlib-1.3.1-hb9d3cd8_2.conda", "c" * 32, None, (), {})
    tz = CondaPackage("tzdata", "2024a", "h0c530f3_0", "https://conda.anaconda.org/conda-forge/noarch/"
                      "tzdata-2024a-h0c530f3_0.conda", "d" * 32, "e" * 64, (), {})
    pip = PipPackage("numpy", "1.26.4", "https://files.pythonhosted.org/x/numpy-1.26.4-cp311-cp311-"
                     "manylinux_2_17_x86_64.whl", "f" * 64, {})
    return CondaLock(platform_, ("conda-forge",), (py, z, tz), (pip,))


def test_yaml_round_trip_of_what_envlock_writes() -> None:
    doc = {"version": 1, "a": {"b": ["x", "1.26", "no", "", "a: b", "# c", "- d", ">=1,<2", "3.11.* *_cp311",
                                     "ünïcode", 'q"uote', "tab\there", "file:///tmp/x y", "~", "null"]},
           "empty": {}, "none": [], "flag": False, "n": 3, "nothing": None,
           "items": [{"k": "v", "m": {"x": "y"}, "l": ["p", "q"]}, {"k": "w", "e": {}}], "z": "end:"}
    text = dump_yaml(doc)
    assert load_yaml(text) == doc
    assert "version: 1\n" in text and "- k: v\n" in text


def test_yaml_reader_refuses_what_it_does_not_know() -> None:
    for bad in ("a: [1, 2\n", "a:\n\t- b\n", "a: b\n  c: d\n", '"unterminated: x\n'):
        with pytest.raises(ValueError):
            load_yaml(bad)


def test_this_platform_names_the_machine() -> None:
    machine = platform.machine().lower()
    assert PLATFORM.startswith(("linux-", "osx-", "win-"))
    if sys.platform.startswith("linux") and machine == "x86_64":
        assert PLATFORM == "linux-64"


def test_document_and_reader_are_strict_about_the_version() -> None:
    lock = _lock()
    back = condalock.loads(condalock.dumps(lock))
    assert back.platform == lock.platform and [p.url for p in back.conda] == sorted(p.url for p in lock.conda)
    assert back.pip == lock.pip
    doc = condalock.to_document(lock)
    assert doc["package"][0]["dependencies"] == {}  # libzlib first (sorted), no deps
    py = next(p for p in doc["package"] if p["name"] == "python")
    assert py["dependencies"] == {"libzlib": ">=1.2.13,<2.0a0", "tzdata": "*"}
    assert py["hash"] == {"md5": "a" * 32, "sha256": "b" * 64}
    doc["version"] = 2
    with pytest.raises(SidecarError, match="version 2 is not supported") as err:
        condalock.from_document(doc)
    assert err.value.exit_code == EXIT_BAD_INPUT


def test_explicit_and_environment_yml_renderings() -> None:
    lock = _lock()
    text = condarender.render_explicit(lock)
    lines = text.splitlines()
    assert "@EXPLICIT" in lines and f"# platform: {PLATFORM}" in lines
    urls = [ln for ln in lines if ln.startswith("https://conda")]
    # dependencies first, each with its md5
    assert [u.rsplit("/", 1)[1].split("-")[0] for u in urls] == ["libzlib", "tzdata", "python"]
    assert all(u.endswith("#" + p) for u, p in zip(urls, ["c" * 32, "d" * 32, "a" * 32]))
    assert f"# pip numpy @ {lock.pip[0].url}#sha256={'f' * 64}" in lines
    spec = ExplicitEnvironmentSpec.from_str(text)  # rattler's own parser
    assert str(spec.platform) == PLATFORM and len(spec.packages) == 3
    env = load_yaml(condarender.render_environment_yml(lock, name="demo"))
    assert env["name"] == "demo" and env["channels"] == ["conda-forge", "nodefaults"]
    assert "python=3.11.7=h0" in env["dependencies"] and "pip" in env["dependencies"]
    assert env["dependencies"][-1] == {"pip": [f"numpy==1.26.4 --hash=sha256:{'f' * 64}"]}


def test_pip_part_takes_the_lock_line_of_the_same_version() -> None:
    lock = _lock()
    one, two, f = "1" * 64, "2" * 64, "f" * 64
    reqs = f"numpy==1.26.4 \\\n    --hash=sha256:{one} \\\n    --hash=sha256:{f}\n    # via keras\n"
    assert f"numpy==1.26.4 --hash=sha256:{one} --hash=sha256:{f}\n" in pip_requirements(lock, reqs)
    # another version in requirements.lock.txt: conda-lock.yml's own pin and hash
    other = pip_requirements(lock, f"numpy==2.0.0 --hash=sha256:{two}\n")
    assert f"numpy==1.26.4 --hash=sha256:{f}\n" in other
    # a direct archive stays a direct reference
    direct = f"numpy @ https://example.org/numpy-1.26.4-py3-none-any.whl --hash=sha256:{two}"
    assert direct + "\n" in pip_requirements(lock, direct + "\n")


def test_capture_leaves_out_what_cannot_be_fetched_again(tmp_path: Path) -> None:
    meta = tmp_path / "conda-meta"
    meta.mkdir()
    base = {"version": "1.0", "build": "0", "depends": [], "subdir": PLATFORM, "md5": "a" * 32,
            "channel": "https://conda.anaconda.org/conda-forge/" + PLATFORM}
    (meta / "ok-1.0-0.json").write_text(json.dumps({**base, "name": "ok", "files": [],
                                                    "url": f"{base['channel']}/ok-1.0-0.conda"}))
    (meta / "local-1.0-0.json").write_text(json.dumps({**base, "name": "local"}))
    (meta / "broken.json").write_text("{")
    cap = condalock.capture(tmp_path, [], [], platform=PLATFORM)
    assert [p.name for p in cap.lock.conda] == ["ok"] and cap.lock.channels == ("conda-forge",)
    assert len(cap.warnings) == 2 and any("local 1.0 has no url" in w for w in cap.warnings)
    assert cap.manifest["records"]["ok-1.0-0.conda"]["channel"].endswith(PLATFORM)


def test_tool_discovery_names_what_it_searched(tmp_path: Path) -> None:
    with pytest.raises(ToolNotFoundError, match="conda not found") as err:
        conda_tool.find_conda(str(tmp_path / "no-such-conda"))
    assert err.value.exit_code == EXIT_ENVIRONMENT
    fake = tmp_path / "bin" / "micromamba"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'micromamba 2.0.0'\n")
    fake.chmod(0o755)
    found = conda_tool.find_conda(environ={"MAMBA_EXE": str(fake)})
    assert found.path == fake and found.flavour == "micromamba"
    with pytest.raises(ToolNotFoundError, match="conda-lock not found"):
        conda_tool.find_conda_lock(environ={"ENVLOCK_CONDA_LOCK": str(tmp_path / "nope")})


# --- capture ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_in_a_conda_env_writes_conda_lock(conda_model: Path, conda_source_env: Path,
                                               conda_channel: Path) -> None:
    sc = read_sidecar(conda_model)
    text = sc.file("conda-lock.yml").read_text()
    lock = condalock.from_sidecar(sc)
    assert lock is not None and lock.platform == PLATFORM
    assert lock.channels == (conda_channel.as_uri(),)
    assert {p.name for p in lock.conda} == {"python", "tomli-w"}
    assert lock.python is not None and lock.python.version == platform.python_version()
    # straight from conda-meta: the same url, md5 and sha256 as the installed records
    for p in lock.conda:
        rec = json.loads((conda_source_env / "conda-meta" / f"{p.fn[:-len('.tar.bz2')]}.json").read_text())
        assert (p.url, p.md5, p.sha256) == (rec["url"], rec["md5"], rec["sha256"])
        assert list(p.depends) == rec["depends"]
        assert sc.manifest["conda"]["records"][p.fn]["noarch" if p.name == "tomli-w" else "subdir"]
    pip = {p.name: p for p in lock.pip}
    assert "tomli-w" not in pip and "envlock" not in pip  # conda's dist-info; an editable install
    assert {"tensorflow-cpu", "numpy", "keras", "rich"} <= set(pip)
    assert all(p.sha256 and p.url.startswith("https://") for p in pip.values())
    assert "manylinux" in pip["numpy"].url and "cp" + MINOR.replace(".", "") in pip["numpy"].url
    conda = sc.manifest["conda"]
    assert conda["conda_owned_distributions"] == ["tomli-w"] and conda["pip_not_locked"] == []
    assert conda["python"]["name"] == "python" and conda["platform"] == PLATFORM
    assert "tomli-w" not in sc.manifest["packages"]["missing_hashes"]
    assert "manager: pip" in text and "manager: conda" in text and text.count("- name: ") == len(pip) + 2
    assert "conda-lock install" in sc.file("REPRODUCE.md").read_text()
    shown = run_cli("show", str(conda_model))
    assert shown.returncode == 0, shown.stderr
    assert f"{PLATFORM}, 2 conda and {len(pip)} pip packages" in " ".join(shown.stdout.split())


@pytest.mark.slow
def test_conda_lock_reads_it_and_renders_explicit(conda_model: Path, conda_lock_exe: Path,
                                                  tmp_path: Path) -> None:
    sc = read_sidecar(conda_model)
    lockfile = sc.file("conda-lock.yml")
    python = conda_lock_exe.parent / "python"
    script = (
        "import json, sys, pathlib, yaml\n"
        "from conda_lock.lockfile import parse_conda_lock_file\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "lock = parse_conda_lock_file(p)\n"
        "print(json.dumps({'n': len(lock.package), 'yaml': yaml.safe_load(p.read_text()),\n"
        "  'managers': sorted({d.manager for d in lock.package}),\n"
        "  'platforms': lock.metadata.platforms}))\n"
    )
    done = subprocess.run([python, "-c", script, lockfile], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    lock = condalock.from_sidecar(sc)
    assert lock is not None
    assert got["n"] == len(lock.conda) + len(lock.pip)
    assert got["managers"] == ["conda", "pip"] and got["platforms"] == [PLATFORM]
    assert got["yaml"] == load_yaml(lockfile.read_text())  # PyYAML reads what our reader reads
    rendered = conda_tool.conda_lock_render(conda_lock_exe, lockfile, tmp_path / "out",
                                            kind="explicit", platform=PLATFORM)
    assert len(rendered) == 1
    text = rendered[0].read_text()
    assert "@EXPLICIT" in text
    for p in lock.conda:
        assert f"{p.url}#{p.md5}" in text
    assert sum(1 for ln in text.splitlines() if ln.startswith("# pip ")) == len(lock.pip)


# --- rebuild ---------------------------------------------------------------------------------


def _record_view(prefix: Path) -> dict[str, dict[str, Any]]:
    """conda-meta records, without what describes this installation rather than the package."""
    out = {}
    for f in (prefix / "conda-meta").glob("*.json"):
        doc = json.loads(f.read_text())
        for k in ("paths_data", "link", "extracted_package_dir", "package_tarball_full_path",
                  "requested_spec", "requested_specs"):
            doc.pop(k, None)
        out[f.name] = doc
    return out


def _pip_inventory(python: Path) -> dict[str, str]:
    from envlock.envs.inventory import inventory

    return inventory(python)


@pytest.mark.slow
def test_conda_strategy_rebuilds_exactly_and_reproduces_the_probe(conda_model: Path, conda_source_env: Path,
                                                                   tmp_path: Path) -> None:
    t = time.perf_counter()
    res = run_cli("env", str(conda_model), "--strategy", "conda", "--json")
    first = time.perf_counter() - t
    assert res.returncode == 0, res.stderr
    env = json.loads(res.stdout)
    assert env["strategy"] == "conda" and env["built"] is True
    prefix = Path(env["path"])
    assert prefix.parent.name == "envs" and not any(p.name.startswith((".tmp-", ".trash-"))
                                                    for p in prefix.parent.iterdir())
    # exactly the locked records: conda-meta as the source environment has it
    assert _record_view(prefix) == _record_view(conda_source_env)
    lock = condalock.from_sidecar(read_sidecar(conda_model))
    assert lock is not None and records_differ(prefix, lock) == []
    assert set(installed_records(prefix)) == {p.fn for p in lock.conda}
    # the prefix names itself, not the build folder (rattler's alternative prefix; uv's scripts)
    sysconfigdata = next((prefix / "lib" / f"python{MINOR}").glob("_sysconfigdata_*.py")).read_text()
    assert str(prefix) in sysconfigdata and ".tmp-" not in sysconfigdata
    for script in (prefix / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.stat().st_size < 100_000:
            assert b".tmp-" not in script.read_bytes(), script
    # plus the pip part, and nothing else
    source = _pip_inventory(conda_source_env / "bin" / "python")
    source.pop("envlock")
    assert _pip_inventory(prefix / "bin" / "python") == source
    # a second resolution finds it
    t = time.perf_counter()
    again = json.loads(run_cli("env", str(conda_model), "--strategy", "conda", "--json").stdout)
    second = time.perf_counter() - t
    assert again["path"] == env["path"] and again["built"] is False
    print(f"\nconda env: built in {first:.1f}s, found in {second:.2f}s")
    # auto picks conda for a lock with conda packages; the worker runs there and the probe matches
    x = np.random.default_rng(1).standard_normal((40, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", str(conda_model), "--input", str(tmp_path / "x.npy"), "--output",
                  str(tmp_path / "y.npy"), "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)
    assert run["strategy"] == "conda" and run["env_path"] == env["path"]
    assert run["validation"]["status"] == "identical"
    # and the predictions are the source environment's, bit for bit
    script = ("import sys, numpy as np, keras, tinylayers; m = keras.models.load_model(sys.argv[1]); "
              "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))")
    envvars = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    _sh([conda_source_env / "bin" / "python", "-c", script, conda_model, tmp_path / "x.npy",
         tmp_path / "ref.npy"], cwd=conda_model.parent, env=envvars)
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "ref.npy"))


def _rewrite_sidecar(model: Path, dest: Path, edit_lock: Any, edit_manifest: Any = None) -> Path:
    """A copy of ``model`` and its sidecar whose conda-lock.yml (and manifest) were edited, written
    by write_sidecar so that it is a valid sidecar of its own."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, dest / model.name)
    sc = read_sidecar(model)
    files: dict[str, bytes | Path] = {p.relative_to(sc.path).as_posix(): p for p in sc.path.rglob("*")
                                      if p.is_file() and p.name != MANIFEST}
    files["conda-lock.yml"] = edit_lock(sc.file("conda-lock.yml").read_text()).encode()
    manifest = json.loads(json.dumps(sc.manifest))
    if edit_manifest is not None:
        edit_manifest(manifest)
    write_sidecar(dest / model.name, manifest, files)
    return dest / model.name


@pytest.mark.slow
def test_a_lock_for_another_platform_is_exit_3(conda_model: Path, tmp_path: Path) -> None:
    other = "osx-arm64"
    model = _rewrite_sidecar(conda_model, tmp_path / "mac", lambda t: t.replace(PLATFORM, other))
    res = run_cli("env", str(model), "--strategy", "conda")
    assert res.returncode == EXIT_ENVIRONMENT, res.stderr
    first, *rest = res.stderr.strip().splitlines()
    assert first == f"envlock: error: conda-lock.yml is for {other}; this machine is {PLATFORM}"
    assert len(rest) <= 1 and "hint" in rest[0]
    # auto does the same: a conda lock is rebuilt with conda, not silently as a venv
    assert run_cli("env", str(model), "--strategy", "auto").returncode == EXIT_ENVIRONMENT


@pytest.mark.slow
def test_a_package_missing_from_the_channel_is_exit_3_naming_it(conda_model: Path, conda_channel: Path,
                                                               tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(conda_channel, mirror)
    gone = next((mirror / "noarch").glob("tomli-w-*.tar.bz2"))
    gone.unlink()
    old, new = conda_channel.as_uri(), mirror.as_uri()

    def move(manifest: dict[str, Any]) -> None:
        for rec in manifest["conda"]["records"].values():
            rec["url"] = rec["url"].replace(old, new)
            rec["channel"] = rec["channel"].replace(old, new)

    model = _rewrite_sidecar(conda_model, tmp_path / "moved", lambda t: t.replace(old, new), move)
    # A machine that never had it: an empty environment cache and an empty package cache (with
    # the file in rattler's cache, checked by sha256, the build would not need the channel).
    home = tmp_path / "home"
    res = run_cli("env", str(model), "--strategy", "conda",
                  env={"ENVLOCK_HOME": str(home), "RATTLER_CACHE_DIR": str(tmp_path / "rattler")})
    assert res.returncode == EXIT_ENVIRONMENT, res.stderr
    first = res.stderr.strip().splitlines()[0]
    assert "tomli-w" in first and gone.name in first and "could not be fetched" in first, first
    # all or nothing: no prefix, no build folder left behind (only the key's lock file)
    assert [p.suffix for p in (home / "envs").iterdir()] == [".lock"]


@pytest.mark.slow
def test_conda_spec_key_follows_the_lock(conda_model: Path) -> None:
    sc = read_sidecar(conda_model)
    spec = CondaSpec.from_sidecar(sc)
    assert spec.require_hashes and spec.lock.python is not None
    lines = [ln for ln in spec.pip_requirements.splitlines() if not ln.startswith("#")]
    assert len(lines) == len(spec.lock.pip) and all("--hash=sha256:" in ln for ln in lines)
    assert CondaSpec.from_sidecar(sc).key == spec.key


# --- exports ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_explicit_and_environment_yml(conda_model: Path, tmp_path: Path) -> None:
    lock = condalock.from_sidecar(read_sidecar(conda_model))
    assert lock is not None
    res = run_cli("export", str(conda_model), "--format", "explicit")
    assert res.returncode == 0, res.stderr
    spec = ExplicitEnvironmentSpec.from_str(res.stdout)  # rattler reads it, hashes included
    assert {p.url for p in spec.packages} == {f"{p.url}#{p.md5}" for p in lock.conda}
    out = tmp_path / "environment.yml"
    res = run_cli("export", str(conda_model), "--format", "environment.yml", "--output", str(out))
    assert res.returncode == 0, res.stderr
    env = load_yaml(out.read_text())
    assert env["channels"] == [*lock.channels, "nodefaults"]
    *specs, pip = env["dependencies"]
    assert {f"{p.name}={p.version}={p.build}" for p in lock.conda} <= set(specs)
    pip_section = pip["pip"]
    assert len(pip_section) == len(lock.pip) and all("--hash=sha256:" in line for line in pip_section)


@pytest.mark.slow
def test_a_killed_conda_build_leaves_nothing_that_looks_complete(conda_model: Path, tmp_path: Path) -> None:
    import signal

    home = tmp_path / "home"
    env = {**os.environ, "ENVLOCK_HOME": str(home), "RATTLER_CACHE_DIR": str(tmp_path / "rattler")}
    argv = [sys.executable, "-m", "envlock", "env", str(conda_model), "--strategy", "conda"]
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    envs = home / "envs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in
                                                  (envs.iterdir() if envs.is_dir() else ())):
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)  # envlock and, with it, the rattler helper
    child.wait(timeout=30)
    assert any(p.name.startswith(".tmp-") for p in envs.iterdir()), "the build never started"
    assert not [p for p in envs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    res = run_cli("env", str(conda_model), "--strategy", "conda", "--json",
                  env={"ENVLOCK_HOME": str(home), "RATTLER_CACHE_DIR": str(tmp_path / "rattler")})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["built"] is True
    assert sorted(p.name for p in envs.iterdir() if p.name.startswith(".")) == []
