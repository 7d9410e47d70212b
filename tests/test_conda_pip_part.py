"""The conda lock's pip part and `save --vendor` name the same file of each distribution.

Both go through :func:`envlock.locking.wheels.choose_file`; this pins it from the outside: the real
``vendor.vendor`` (its files served from a ``reuse`` folder, no network) and the real
``condalock.capture`` (on a prefix whose pip-installed distributions carry ``WHEEL`` files),
given the same packages and tags, must agree, including where two wheels share a tag (which a
"any shared tag" rule once resolved differently) and where no wheel matches the installed tags.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from packaging.tags import Tag

from envlock.index.lookup import DistFile
from envlock.locking import condalock, vendor
from envlock.locking.lockfiles import LockedPackage
from envlock.settings import Settings

LINUX = Tag("cp310", "cp310", "manylinux_2_17_x86_64")
LINUX2014 = Tag("cp310", "cp310", "manylinux2014_x86_64")
# This interpreter would pick the narrower manylinux2014 wheel first: the exact match must win.
SUPPORTED = [LINUX2014, LINUX, Tag("py3", "none", "any")]


def _package(folder: Path, name: str, filenames: list[str]) -> LockedPackage:
    files = []
    for filename in filenames:
        data = f"{filename} bytes".encode()
        (folder / filename).write_bytes(data)
        files.append(DistFile(filename=filename, url=f"https://example.invalid/{filename}",
                              sha256=hashlib.sha256(data).hexdigest()))
    return LockedPackage(name=name, version="1.0", kind="index", files=tuple(files),
                         index_url="https://example.invalid/simple", direct_url=None, requires=(), via=())


def _dist(prefix: Path, name: str, tags: list[str]) -> dict[str, str]:
    dist_info = prefix / "lib" / "python3.10" / "site-packages" / f"{name}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "WHEEL").write_text("Wheel-Version: 1.0\n" + "".join(f"Tag: {t}\n" for t in tags))
    return {"name": name, "version": "1.0", "dist_info": str(dist_info)}


def test_vendored_wheel_and_conda_pip_part_choose_the_same_file(tmp_path: Path) -> None:
    served, prefix = tmp_path / "served", tmp_path / "prefix"
    served.mkdir()
    (prefix / "conda-meta").mkdir(parents=True)
    packages = [
        _package(served, "shared", ["shared-1.0-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                                    "shared-1.0-cp310-cp310-manylinux2014_x86_64.whl",
                                    "shared-1.0.tar.gz"]),
        _package(served, "built", ["built-1.0-cp310-cp310-manylinux_2_17_x86_64.whl", "built-1.0.tar.gz"]),
        _package(served, "source", ["source-1.0-cp39-cp39-macosx_11_0_arm64.whl", "source-1.0.zip",
                                    "source-1.0.tar.gz"]),
    ]
    dists = [_dist(prefix, "shared", [str(LINUX), str(LINUX2014)]),
             _dist(prefix, "built", ["cp310-cp310-linux_x86_64"]),  # built here from its sdist
             _dist(prefix, "source", ["cp310-cp310-linux_x86_64"])]
    settings = Settings(home=tmp_path / "home", config_dir=tmp_path / "config",
                        index_url="https://example.invalid/simple", environ={"HOME": str(tmp_path)})

    vendored = vendor.vendor(packages, dists, settings, reuse=[served], supported=SUPPORTED)
    captured = condalock.capture(prefix, dists, packages, platform="linux-64", supported=SUPPORTED)

    assert {f.source for f in vendored.files} == {"reused"}  # nothing came from the network
    by_vendor = {f.name: f.filename for f in vendored.files}
    by_conda = {p.name: p.url.rsplit("/", 1)[-1] for p in captured.lock.pip}
    assert by_vendor == by_conda == {
        "shared": "shared-1.0-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "built": "built-1.0-cp310-cp310-manylinux_2_17_x86_64.whl",
        "source": "source-1.0.tar.gz",
    }
    assert {p.name: p.sha256 for p in captured.lock.pip} == {f.name: f.sha256 for f in vendored.files}
