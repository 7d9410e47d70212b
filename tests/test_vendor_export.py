"""Vendoring, rebuilds from a sidecar's wheels/ with no index, locked versions gone from the index,
and exports. Against a real local index server, real uv and pip installs, the real CLI.

The end-to-end versions with TensorFlow (a Python 3.10 sidecar, vendored and exported) are in
test_legacy.py; these use hand-built wheels and run in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import run_cli
from packaging.tags import Tag, sys_tags

from envlock.commands.export import FORMATS, export
from envlock.envs.cache import EnvCache
from envlock.envs.inventory import inventory
from envlock.envs.key import EnvSpec
from envlock.errors import BadInputError, EnvironmentBuildError
from envlock.index.lookup import DistFile, IndexClient
from envlock.locking import vendor, wheels
from envlock.locking.lockfiles import LockedPackage
from envlock.locking.reqfile import locked_pins, read_requirements
from envlock.settings import Settings
from envlock.sidecar.store import write_sidecar

DATA = Path(__file__).resolve().parent / "data" / "index"
PY = platform.python_version()


def _load_localindex() -> ModuleType:
    spec = importlib.util.spec_from_file_location("envlock_test_localindex", DATA / "localindex.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


li = _load_localindex()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """alpha 1.0 and 1.1 (yanked), beta 2.0 on "simple"; gamma 3.0 exists only as a file in
    ``elsewhere/`` (deleted from the index); "tampered" serves alpha with a wrong sha256."""
    files = tmp_path_factory.mktemp("index-files")
    server = li.LocalIndex()
    a10 = li.Listed.of(li.build_wheel(files, "alpha", "1.0"))
    a11 = li.Listed.of(li.build_wheel(files, "alpha", "1.1"), yanked="broken build")
    b20 = li.Listed.of(li.build_wheel(files, "beta", "2.0", requires=("alpha>=1.0",)))
    server.add("simple", "alpha", a10, a11)
    server.add("simple", "beta", b20)
    server.add("tampered", "alpha", li.Listed(a10.filename, "0" * 64, a10.size, a10.path))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    li.build_wheel(elsewhere, "gamma", "3.0")
    server.elsewhere = elsewhere
    yield server
    server.close()


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(home=tmp_path / "home", config_dir=tmp_path / "config", index_url=url,
                    http_timeout=5.0, environ={"HOME": str(tmp_path)})


def _sha(path: Path) -> str:
    return vendor.file_sha256(path)


def _lock_line(name: str, version: str, *hashes: str) -> str:
    return f"{name}=={version} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in hashes) + "\n"


def _refused_url() -> str:
    """An index URL on a port where nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def _manifest(**over: Any) -> dict[str, Any]:
    """The manifest fields that env, run's resolution and export read, for a sidecar made here."""
    m: dict[str, Any] = {
        "envlock_version": "0.1.0", "created": "2026-01-02T03:04:05Z", "command": "test",
        "model": {"file": "model.keras", "format": "keras"},
        "python": {"version": PY, "implementation": "cpython"},
        "platform": {"os": "linux", "machine": "x86_64", "libc": {"name": "glibc", "version": "2.36"}},
        "gpu": {"gpus": []}, "cuda": {"is_cuda_build": False},
        "determinism": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONHASHSEED": None}},
        "packages": {"complete": True, "missing_hashes": [], "risks": [], "vendored": None},
    }
    m.update(over)
    return m


def _sidecar(model: Path, lock: str, *, wheels: Path | None = None, **over: Any) -> Path:
    files: dict[str, bytes | Path] = {"requirements.lock.txt": lock.encode()}
    if wheels is not None:
        files.update({f"wheels/{w.name}": w for w in sorted(wheels.glob("*.whl"))})
        over.setdefault("packages", {**_manifest()["packages"], "vendored": {"complete": True}})
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"not read by env or export")
    return write_sidecar(model, _manifest(**over), files).path


# --- choosing the file -----------------------------------------------------------------------


def _f(filename: str) -> DistFile:
    return DistFile(filename=filename, url=f"https://example.invalid/{filename}", sha256="a" * 64)


NUMPY = [_f("numpy-1.26.4-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
         _f("numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
         _f("numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl"),
         _f("numpy-1.26.4.tar.gz")]


def test_choose_the_installed_wheel_by_its_tags() -> None:
    installed = frozenset({Tag("cp310", "cp310", "manylinux_2_17_x86_64"),
                           Tag("cp310", "cp310", "manylinux2014_x86_64")})
    assert wheels.choose_file(NUMPY, installed, []).filename.startswith("numpy-1.26.4-cp310-cp310-many")


def test_choose_by_this_interpreters_tags_then_the_sdist() -> None:
    linux311 = [Tag("cp311", "cp311", "manylinux_2_17_x86_64"), Tag("py3", "none", "any")]
    assert "cp311-cp311-manylinux" in wheels.choose_file(NUMPY, frozenset(), linux311).filename
    # Locally built from its sdist (tags no index file has): the sdist.
    local = frozenset({Tag("cp312", "cp312", "linux_x86_64")})
    assert wheels.choose_file(NUMPY, local, [Tag("cp312", "cp312", "linux_x86_64")]).filename \
        == "numpy-1.26.4.tar.gz"
    assert wheels.choose_file(NUMPY[:3], local, [Tag("cp312", "cp312", "linux_x86_64")]) is None


def test_installed_tags_come_from_the_dist_info(tmp_path: Path) -> None:
    (tmp_path / "WHEEL").write_text("Wheel-Version: 1.0\nTag: cp310-cp310-manylinux_2_17_x86_64\n"
                                    "Tag: cp310-cp310-manylinux2014_x86_64\n")
    assert wheels.installed_tags(tmp_path) == {Tag("cp310", "cp310", "manylinux_2_17_x86_64"),
                                                  Tag("cp310", "cp310", "manylinux2014_x86_64")}
    assert wheels.installed_tags(tmp_path / "missing") == frozenset()
    assert wheels.installed_tags(None) == frozenset()


# --- vendor(): download, check, cache --------------------------------------------------------


def _locked(settings: Settings, *pins: tuple[str, str]) -> list[LockedPackage]:
    found = IndexClient(settings).lookup_many(pins)
    return [LockedPackage(name=n, version=v, kind="index", files=found[(n, v)].files,
                          index_url=found[(n, v)].index_url, direct_url=None, requires=(), via=(),
                          error=found[(n, v)].error) for n, v in pins]


def test_vendor_downloads_checks_and_caches(tmp_path: Path, index: Any) -> None:
    settings = _settings(tmp_path, index.url("simple"))
    pkgs = _locked(settings, ("alpha", "1.0"), ("beta", "2.0"))
    editable = LockedPackage("mine", "0.1", "editable", (), None, {"url": "file:///src"}, (), ())
    index.reset()
    first = vendor.vendor([*pkgs, editable], [], settings)
    assert sorted(f.filename for f in first.files) == ["alpha-1.0-py3-none-any.whl",
                                                       "beta-2.0-py3-none-any.whl"]
    assert {f.source for f in first.files} == {"downloaded"}
    for f in first.files:
        assert f.path.is_file() and _sha(f.path) == f.sha256
        assert f.path.parent.name == f.sha256  # content-addressed
    assert first.complete and first.manifest()["files"] == 2
    assert len([r for r in index.requests if r.path.startswith("/files/")]) == 2
    # The editable install is not in requirements.lock.txt: nothing to vendor, not a gap.
    index.reset()
    again = vendor.vendor(pkgs, [], settings)
    assert {f.source for f in again.files} == {"cache"} and index.requests == []
    assert vendor.sidecar_files(again) == {f"wheels/{f.filename}": f.path for f in again.files}


def test_vendor_reuses_a_previous_wheels_folder(tmp_path: Path, index: Any) -> None:
    settings = _settings(tmp_path, index.url("simple"))
    pkgs = _locked(settings, ("alpha", "1.0"))
    previous = tmp_path / "model.keras.envlock" / "wheels"
    previous.mkdir(parents=True)
    src = Path(index.files["alpha-1.0-py3-none-any.whl"])
    (previous / src.name).write_bytes(src.read_bytes())
    index.reset()
    got = vendor.vendor(pkgs, [], settings, reuse=[previous])
    assert [f.source for f in got.files] == ["reused"] and index.requests == []


def test_vendor_refuses_a_file_whose_hash_differs(tmp_path: Path, index: Any) -> None:
    settings = _settings(tmp_path, index.url("tampered"))
    pkgs = _locked(settings, ("alpha", "1.0"))
    with pytest.raises(EnvironmentBuildError, match=r"alpha 1\.0 .*sha256") as err:
        vendor.vendor(pkgs, [], settings)
    assert "could not vendor 1 package" in str(err.value)
    assert not list((tmp_path / "home").rglob("*.whl"))  # nothing unchecked is kept


def test_vendor_names_packages_without_files(tmp_path: Path, index: Any) -> None:
    settings = _settings(tmp_path, index.url("simple"))
    gone = LockedPackage("gamma", "3.0", "index", (), None, None, (), (), error="not found on the index")
    with pytest.raises(EnvironmentBuildError, match=r"gamma 3\.0 \(not found on the index\)"):
        vendor.vendor([*_locked(settings, ("alpha", "1.0")), gone], [], settings)


# --- rebuilds: from wheels/ with no index, a version gone from the index, yanked pins --------


def _env_cli(model: Path, home: Path, index_url: str, *extra: str, uv_cache: Path | None = None) -> Any:
    env = {"ENVLOCK_HOME": str(home), "UV_INDEX_URL": index_url, "PIP_INDEX_URL": index_url}
    if uv_cache is not None:
        env["UV_CACHE_DIR"] = str(uv_cache)
    return run_cli("env", str(model), "--json", *extra, env=env, timeout=300)


def test_vendored_sidecar_builds_with_every_index_unreachable(tmp_path: Path, index: Any) -> None:
    files = Path(index.files["alpha-1.0-py3-none-any.whl"]).parent
    wheels = tmp_path / "w"
    wheels.mkdir()
    lock = ""
    for name in ("alpha-1.0-py3-none-any.whl", "beta-2.0-py3-none-any.whl"):
        (wheels / name).write_bytes((files / name).read_bytes())
        n, v = name.split("-")[:2]
        lock += _lock_line(n, v, _sha(wheels / name))
    model = tmp_path / "m" / "model.keras"
    _sidecar(model, lock, wheels=wheels)
    empty_cache = tmp_path / "uv-cache"
    res = _env_cli(model, tmp_path / "home", _refused_url(), uv_cache=empty_cache)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["built"] is True
    assert inventory(Path(doc["python"])) == {"alpha": "1.0", "beta": "2.0"}


def test_a_version_gone_from_the_index_is_exit_3_naming_it_then_find_links(tmp_path: Path,
                                                                           index: Any) -> None:
    gamma = index.elsewhere / "gamma-3.0-py3-none-any.whl"
    alpha = Path(index.files["alpha-1.0-py3-none-any.whl"])
    lock = _lock_line("alpha", "1.0", _sha(alpha)) + _lock_line("gamma", "3.0", _sha(gamma))
    model = tmp_path / "m" / "model.keras"
    _sidecar(model, lock)
    res = _env_cli(model, tmp_path / "home", index.url("simple"))
    assert res.returncode == 3, res.stderr
    first, hint = res.stderr.strip().splitlines()[:2]
    assert "gamma==3.0 not found on " + index.url("simple") in first
    assert "no longer available" in first and "--find-links DIR" in hint
    res = _env_cli(model, tmp_path / "home", index.url("simple"), "--find-links", str(index.elsewhere))
    assert res.returncode == 0, res.stderr
    assert inventory(Path(json.loads(res.stdout)["python"])) == {"alpha": "1.0", "gamma": "3.0"}


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_missing_version_message_from_each_installer(tmp_path: Path, index: Any, installer: str) -> None:
    gamma = index.elsewhere / "gamma-3.0-py3-none-any.whl"
    lock = tmp_path / "lock.txt"
    lock.write_text(_lock_line("gamma", "3.0", _sha(gamma)))
    cache = EnvCache(_settings(tmp_path, index.url("simple")), installer=installer)
    with pytest.raises(EnvironmentBuildError, match=r"^gamma==3\.0 not found on http") as err:
        cache.ensure(EnvSpec.from_lock(lock, PY))
    assert err.value.hint and "--find-links" in err.value.hint
    offline = EnvSpec.from_lock(lock, PY, find_links=[tmp_path / "empty"], no_index=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvironmentBuildError, match=r"gamma==3\.0 not found in .*empty"):
        cache.ensure(offline)
    assert cache.list() == []


def test_a_yanked_pin_still_installs(tmp_path: Path, index: Any) -> None:
    # PEP 592: an == pin selects a yanked version; only a deleted one is an error.
    a11 = Path(index.files["alpha-1.1-py3-none-any.whl"])
    lock = tmp_path / "lock.txt"
    lock.write_text(_lock_line("alpha", "1.1", _sha(a11)))
    env = EnvCache(_settings(tmp_path, index.url("simple"))).ensure(EnvSpec.from_lock(lock, PY))
    assert inventory(env.python) == {"alpha": "1.1"}


# --- exports ---------------------------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def check_dockerfile(text: str, context: Path, model: str, python_version: str) -> list[tuple[str, str]]:
    """The instructions a build would run: base image, COPY sources present in the context,
    the environment built by `envlock env`, `envlock run` as the entry point."""
    ins = _dockerfile_instructions(text)
    assert ins[0] == ("FROM", f"--platform=linux/amd64 python:{python_version}-slim-bookworm")
    copies = [shlex.split(rest) for word, rest in ins if word == "COPY"]
    assert copies, text
    # envlock itself comes from a wheel the user builds into the context ("envlock" on PyPI is
    # another project); everything else is the model and its sidecar, there already.
    assert copies[0] == ["envlock-*.whl", "/tmp/envlock-wheel/"]
    assert "pip install envlock" not in text.replace("`pip install envlock`", "")
    for src, _dest in copies[1:]:
        assert (context / src).exists(), src
    assert any(word == "RUN" and f"envlock env {model}" in rest for word, rest in ins)
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert entry[1:3] == ["run", model] and entry[0].endswith("/bin/envlock")
    return ins


def test_export_formats_are_a_dict_of_functions() -> None:
    assert {"dockerfile", "requirements"} <= set(FORMATS) and all(callable(f) for f in FORMATS.values())


def test_dockerfile_and_requirements_for_a_synthetic_sidecar(tmp_path: Path) -> None:
    model = tmp_path / "proj" / "model.keras"
    lock = "#\n# header\n#\n" + _lock_line("alpha", "1.0", "a" * 64) + "    # via beta\n"
    _sidecar(model, lock)
    docker = export(model, "dockerfile").text
    ins = check_dockerfile(docker, model.parent, "model.keras", PY)
    assert "--trust-code" not in docker  # no code/ in this sidecar
    assert not any(w == "COPY" and "wheels" in r for w, r in ins)
    assert "TF_ENABLE_ONEDNN_OPTS=0" in docker and "PYTHONHASHSEED" not in docker
    out = tmp_path / "out" / "requirements.txt"
    result = export(model, "requirements", output=out)
    assert out.read_text() == result.text
    assert read_requirements(result.text) == [("alpha", "1.0", ("sha256:" + "a" * 64,))]
    assert "--require-hashes" in result.text.splitlines() and "# header" not in result.text
    assert "--no-index" not in result.text


def test_vendored_exports_use_the_wheels(tmp_path: Path, index: Any) -> None:
    src = Path(index.files["alpha-1.0-py3-none-any.whl"])
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / src.name).write_bytes(src.read_bytes())
    model = tmp_path / "proj" / "model.keras"
    _sidecar(model, _lock_line("alpha", "1.0", _sha(src)), wheels=wheels)
    out = tmp_path / "proj" / "deploy" / "requirements.txt"
    text = export(model, "requirements", output=out).text
    assert "--no-index" in text.splitlines()
    assert "--find-links ../model.keras.envlock/wheels" in text.splitlines()
    # Plain pip, no index at all, from another folder: the wheels are found relative to the file.
    venv = tmp_path / "pipvenv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    done = subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", "-r", out],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PIP_INDEX_URL": _refused_url()})
    assert done.returncode == 0, done.stderr
    assert inventory(py).get("alpha") == "1.0"
    docker = export(model, "dockerfile").text
    ins = check_dockerfile(docker, model.parent, "model.keras", PY)
    assert "from the sidecar's wheels/ alone" in docker
    assert ("COPY", "model.keras.envlock model.keras.envlock") in ins


def test_export_errors_and_cli(tmp_path: Path) -> None:
    model = tmp_path / "proj" / "model.keras"
    _sidecar(model, _lock_line("alpha", "1.0", "a" * 64),
             platform={"os": "darwin", "machine": "arm64", "libc": None})
    with pytest.raises(BadInputError, match="darwin"):
        export(model, "dockerfile")
    res = run_cli("export", str(model), "--format", "nope")
    assert res.returncode == 2 and "unknown export format 'nope'" in res.stderr
    res = run_cli("export", str(model), "--format", "requirements", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "envlock.export/1" and doc["output"] is None
    assert doc["text"].startswith("# model.keras: every package")
    res = run_cli("export", str(model), "--format", "requirements")
    assert res.stdout == doc["text"]  # stdout gets the text as is
    res = run_cli("export", str(tmp_path / "nothing.keras"), "--format", "requirements")
    assert res.returncode == 2 and "no sidecar here" in res.stderr


def test_exports_of_a_real_sidecar(saved_tiny: Path, tmp_path: Path) -> None:
    sc = saved_tiny.parent / "model.keras.envlock"
    docker = export(saved_tiny, "dockerfile").text
    check_dockerfile(docker, saved_tiny.parent, "model.keras", PY)
    assert '"--trust-code"' in docker  # the sidecar holds code/
    text = export(saved_tiny, "requirements").text
    assert {(n, v) for n, v, _ in read_requirements(text)} == set(
        locked_pins((sc / "requirements.lock.txt").read_text()).items())
    assert all(h for _, _, h in read_requirements(text))
    assert re.search(r"^# Saved .* with cpython " + re.escape(PY), text, re.M)


def test_sys_tags_rank_is_used_when_nothing_is_installed() -> None:
    here = list(sys_tags())
    pure = _f("alpha-1.0-py3-none-any.whl")
    assert wheels.choose_file([pure], frozenset(), here) == pure
