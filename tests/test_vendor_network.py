"""`save --vendor`'s network failures: one short line naming the first packages, then a count.

Real look-ups and downloads against a port where nothing listens (refused at once).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from envlock.errors import EnvironmentBuildError
from envlock.index.lookup import DistFile, IndexClient
from envlock.locking import vendor
from envlock.locking.lockfiles import LockedPackage
from envlock.settings import Settings

NAMES = [f"pkg{i:02d}" for i in range(12)]


def _refused_root() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    return f"http://127.0.0.1:{port}"


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(home=tmp_path / "home", config_dir=tmp_path / "config", index_url=url,
                    http_timeout=5.0, environ={"HOME": str(tmp_path)})


def _package(name: str, files: tuple[DistFile, ...] = (), error: str | None = None,
             index_url: str | None = None) -> LockedPackage:
    return LockedPackage(name=name, version="1.0", kind="index", files=files, index_url=index_url,
                         direct_url=None, requires=(), via=(), error=error)


def test_an_unreachable_index_names_three_packages_and_counts_the_rest(tmp_path: Path) -> None:
    url = f"{_refused_root()}/simple"
    settings = _settings(tmp_path, url)
    found = IndexClient(settings).lookup_many([(n, "1.0") for n in NAMES])
    assert {r.error_kind for r in found.values()} == {"refused"}
    pkgs = [_package(n, error=found[(n, "1.0")].error) for n in NAMES]
    with pytest.raises(EnvironmentBuildError) as err:
        vendor.vendor(pkgs, [], settings)
    message = err.value.message
    assert message.startswith("could not vendor 12 package(s): pkg00 1.0 (cannot reach " + url)
    assert "pkg02 1.0" in message and "pkg03" not in message
    assert message.endswith("; and 9 more")
    assert len(message) < 400, message


def test_a_download_that_is_refused_says_so_for_each_file(tmp_path: Path) -> None:
    root = _refused_root()
    settings = _settings(tmp_path, f"{root}/simple")
    pkgs = [_package(n, (DistFile(f"{n}-1.0-py3-none-any.whl", f"{root}/files/{n}-1.0-py3-none-any.whl",
                                  "0" * 64),)) for n in NAMES[:2]]
    with pytest.raises(EnvironmentBuildError) as err:
        vendor.vendor(pkgs, [], settings)
    assert err.value.message == "could not vendor 2 package(s): " + "; ".join(
        f"{n} 1.0 (could not download: cannot reach {root}/files/{n}-1.0-py3-none-any.whl: "
        "Connection refused)" for n in NAMES[:2])
    assert not list((tmp_path / "home").rglob("*.part"))  # nothing half-downloaded is left


@pytest.mark.slow
def test_save_vendor_with_the_index_unreachable_is_one_short_line(tiny_project: Path, tmp_path: Path) -> None:
    """The CLI end to end (issue 11: this line was ~3,000 characters, cut only by the CLI)."""
    import hashlib
    import os
    import shutil

    from conftest import run_cli

    folder = tmp_path / "project"
    shutil.copytree(tiny_project, folder, ignore=shutil.ignore_patterns("*.envlock", "__pycache__"))
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    url = f"{_refused_root()}/simple"
    env = {k: "" for k in ("UV_DEFAULT_INDEX", "PIP_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX",
                           "PIP_EXTRA_INDEX_URL") if k in os.environ}
    env.update({"ENVLOCK_HOME": str(tmp_path / "home"), "UV_INDEX_URL": url, "NO_PROXY": "*"})
    res = run_cli("save", "model.keras", "--vendor", cwd=folder, env=env)
    assert res.returncode == 3, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("envlock: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert errors[0].startswith("envlock: error: could not vendor ") and "more characters" not in errors[0]
    assert re.search(r"; and \d+ more$", errors[0]), errors[0]
    assert f"cannot reach {url}" in errors[0] and len(errors[0]) < 600, errors[0]
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    print("\n" + errors[0])
