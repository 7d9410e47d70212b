"""envlock.index.lookup against a real local index server, then against the real PyPI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import load_localindex

from envlock.index.lookup import DistFile, IndexClient, LookupResult, redact_url
from envlock.settings import Settings
from envlock.worker.payload.inventory import installed

li = load_localindex()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[li.LocalIndex]:
    files = tmp_path_factory.mktemp("index-files")
    server = li.LocalIndex()
    a10w = li.Listed.of(li.build_wheel(files, "alpha", "1.0"))
    a10s = li.Listed.of(li.build_sdist(files, "alpha", "1.0"))
    a11w = li.Listed.of(li.build_wheel(files, "alpha", "1.1"), yanked="broken build",
                        requires_python=">=3.8")
    b20w = li.Listed.of(li.build_wheel(files, "beta", "2.0", requires=("alpha>=1.0",)))
    for name in ("simple", "html", "private"):
        server.add(name, "alpha", a10w, a10s, a11w)
    server.indexes["html"].html_only = True
    server.indexes["private"].auth = "user:s3cr%t"
    # The extra index also has alpha 1.0, but only its sdist: a result of one file shows that
    # the extra answered, two that the primary did.
    server.add("extra", "alpha", a10s)
    server.add("extra", "beta", b20w)
    server.add("broken", "alpha", a10w)
    server.indexes["broken"].status = 500
    yield server
    server.close()


@pytest.fixture
def seen(index: li.LocalIndex) -> li.LocalIndex:
    index.reset()
    return index


def settings(tmp_path: Path, *urls: str, offline: bool = False) -> Settings:
    # An explicit environ: no proxy, netrc or index variables of the machine leak in.
    return Settings(home=tmp_path / "home", config_dir=tmp_path / "config", index_url=urls[0],
                    extra_index_urls=tuple(urls[1:]), offline=offline, http_timeout=5.0,
                    environ={"HOME": str(tmp_path)})


def file_of(index: li.LocalIndex, filename: str) -> li.Listed:
    return next(f for cfg in index.indexes.values() for fs in cfg.projects.values() for f in fs
                if f.filename == filename)


def test_json_is_negotiated_and_hashes_are_those_of_the_files(tmp_path: Path, seen: li.LocalIndex) -> None:
    res = IndexClient(settings(tmp_path, seen.url("simple"))).lookup("alpha", "1.0")
    assert res.error is None and res.ok
    assert res.index_url == seen.url("simple")
    assert [f.filename for f in res.files] == ["alpha-1.0-py3-none-any.whl", "alpha-1.0.tar.gz"]
    for f in res.files:
        real = file_of(seen, f.filename)
        assert f.sha256 == real.sha256 and f.size == real.size
        assert f.url == f"{seen.root}/files/{f.filename}"  # a relative URL, joined to the page
        assert f.upload_time == "2024-01-02T03:04:05.123456Z" and not f.yanked
    (page,) = seen.pages_seen()
    assert page.headers["accept"].startswith("application/vnd.pypi.simple.v1+json")
    assert page.content_type == li.JSON_TYPE
    assert page.gzipped  # asked for gzip, got it, read it


def test_html_fallback_reads_hashes_requires_python_and_yanked(tmp_path: Path, seen: li.LocalIndex) -> None:
    client = IndexClient(settings(tmp_path, seen.url("html")))
    found = client.lookup_many([("alpha", "1.0"), ("alpha", "1.1")])
    assert all(p.content_type == "text/html" for p in seen.pages_seen())
    # Two versions of one project: one page fetched, not two.
    assert len(seen.pages_seen()) == 1
    old, new = found[("alpha", "1.0")], found[("alpha", "1.1")]
    assert {f.sha256 for f in old.files} == {file_of(seen, f.filename).sha256 for f in old.files}
    assert len(old.files) == 2 and old.files[0].size is None  # PEP 503 has no sizes
    (wheel,) = new.files
    assert wheel == DistFile(filename="alpha-1.1-py3-none-any.whl",
                             url=f"{seen.root}/files/alpha-1.1-py3-none-any.whl",
                             sha256=file_of(seen, wheel.filename).sha256, size=None,
                             upload_time=None, yanked=True, requires_python=">=3.8")


def test_warm_lookup_does_not_touch_the_network(tmp_path: Path, seen: li.LocalIndex) -> None:
    s = settings(tmp_path, seen.url("simple"))
    cold = IndexClient(s).lookup_many([("alpha", "1.0"), ("alpha", "1.1")])
    before = len(seen.requests)
    warm = IndexClient(s).lookup_many([("alpha", "1.0"), ("alpha", "1.1")])
    assert len(seen.requests) == before
    assert warm == cold
    # A warm cache serves offline too, which proves it needs no network at all.
    assert IndexClient(s.with_(offline=True)).lookup_many([("alpha", "1.0")])[("alpha", "1.0")] == cold[
        ("alpha", "1.0")]


def test_warm_lookup_of_a_hundred_packages_is_fast(tmp_path: Path, seen: li.LocalIndex) -> None:
    for i in range(100):
        seen.add("simple", f"pkg{i:03d}", *(
            li.Listed(f"pkg{i:03d}-{v}-py3-none-any.whl", f"{i:03d}{v}".ljust(64, "0"), 1000)
            for v in ("1.0", "1.1", "2.0")
        ))
    pins = [(f"pkg{i:03d}", "1.1") for i in range(100)]
    s = settings(tmp_path, seen.url("simple"))
    t0 = time.perf_counter()
    cold = IndexClient(s).lookup_many(pins)
    t1 = time.perf_counter()
    pages = len(seen.pages_seen())
    warm = IndexClient(s).lookup_many(pins)
    t2 = time.perf_counter()
    print(f"\nlocal index, 100 packages: cold {t1 - t0:.3f}s ({pages} pages), warm {t2 - t1:.4f}s")
    assert pages == 100 and len(seen.pages_seen()) == 100
    assert warm == cold and all(r.ok and len(r.files) == 1 for r in warm.values())
    # Keep-alive: far fewer connections than pages.
    assert seen.connections <= 16


def test_etag_revalidation_when_a_version_is_not_cached(tmp_path: Path, seen: li.LocalIndex) -> None:
    s = settings(tmp_path, seen.url("simple"))
    IndexClient(s).lookup("alpha", "1.0")
    etag_first = seen.pages_seen()[-1]
    assert etag_first.status == 200
    res = IndexClient(s).lookup("alpha", "1.1")  # not in the per-version cache yet
    again = seen.pages_seen()[-1]
    assert again.headers.get("if-none-match") and again.status == 304
    assert res.ok and res.files[0].filename == "alpha-1.1-py3-none-any.whl"
    # The page changes (a new release): the validator no longer matches, a fresh page comes.
    files = tmp_path / "more"
    files.mkdir()
    seen.add("simple", "gamma", li.Listed.of(li.build_wheel(files, "gamma", "0.1")))
    IndexClient(s).lookup("gamma", "0.1")
    seen.add("simple", "gamma", li.Listed.of(li.build_wheel(files, "gamma", "0.2")))
    res = IndexClient(s).lookup("gamma", "0.2")
    last = seen.pages_seen()[-1]
    assert last.headers.get("if-none-match") and last.status == 200
    assert res.ok and res.files[0].filename == "gamma-0.2-py3-none-any.whl"


CONCURRENT = """
import json, sys
from pathlib import Path
from envlock.index.lookup import IndexClient
from envlock.settings import Settings
home, url = Path(sys.argv[1]), sys.argv[2]
s = Settings(home=home, config_dir=home / "c", index_url=url, environ={"HOME": str(home)})
found = IndexClient(s).lookup_many([("alpha", "1.0"), ("alpha", "1.1"), ("beta", "2.0")])
print(json.dumps(sorted([list(k), [f.sha256 for f in r.files], r.error] for k, r in found.items())))
"""


def test_processes_sharing_one_cache(tmp_path: Path, seen: li.LocalIndex) -> None:
    home = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(home), seen.url("simple")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out for out, _ in outs}) == 1
    # Every process wrote the same entries; renames leave no half-written or temporary file.
    entries = [p for p in home.rglob("*") if p.is_file()]
    assert entries and not [p for p in entries if p.name.endswith(".tmp")]
    for path in entries:
        if path.suffix == ".json":
            json.loads(path.read_text())
    # And a fifth process finds all of it on disk.
    before = len(seen.requests)
    subprocess.run([sys.executable, "-c", CONCURRENT, str(home), seen.url("simple")], check=True,
                   capture_output=True, timeout=60)
    assert len(seen.requests) == before + 1  # beta is on no index here: asked again, as it should


def test_unknown_project_and_unknown_version(tmp_path: Path, seen: li.LocalIndex) -> None:
    url = seen.url("simple")
    found = IndexClient(settings(tmp_path, url)).lookup_many([("no-such-thing", "1.0"), ("alpha", "9.9")])
    assert found[("no-such-thing", "1.0")] == LookupResult("no-such-thing", "1.0", None, (),
                                                           f"not found on {url}")
    assert found[("alpha", "9.9")].error == f"version 9.9 not found on {url}"
    assert not found[("alpha", "9.9")].files
    bad = IndexClient(settings(tmp_path, url)).lookup("alpha", "not a version")
    assert bad.error and "PEP 440" in bad.error


def test_offline_makes_no_request_and_says_so(tmp_path: Path, seen: li.LocalIndex) -> None:
    res = IndexClient(settings(tmp_path, seen.url("simple"), offline=True)).lookup("alpha", "1.0")
    assert res == LookupResult("alpha", "1.0", None, (), "offline")
    assert seen.requests == []


def test_offline_falls_back_to_a_stored_page(tmp_path: Path, seen: li.LocalIndex) -> None:
    s = settings(tmp_path, seen.url("simple"))
    IndexClient(s).lookup("alpha", "1.0")  # stores the page (it has an ETag) and 1.0
    n = len(seen.requests)
    res = IndexClient(s.with_(offline=True)).lookup("alpha", "1.1")
    assert len(seen.requests) == n
    assert res.ok and res.files[0].filename == "alpha-1.1-py3-none-any.whl"


def test_credentials_from_the_url_are_sent_and_never_stored(tmp_path: Path, seen: li.LocalIndex) -> None:
    url = seen.url("private", userinfo="user:s3cr%25t")
    res = IndexClient(settings(tmp_path, url)).lookup("alpha", "1.0")
    assert res.ok, res.error
    assert res.index_url == seen.url("private")
    assert seen.pages_seen()[-1].headers["authorization"].startswith("Basic ")
    assert all("s3cr" not in f.url for f in res.files)
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file():
            assert b"s3cr" not in path.read_bytes(), path

    wrong_url = seen.url("private", userinfo="user:nope")
    wrong = IndexClient(settings(tmp_path / "w", wrong_url)).lookup("alpha", "1.0")
    assert not wrong.files and wrong.error and "401" in wrong.error and "nope" not in wrong.error
    missing = IndexClient(settings(tmp_path / "m", seen.url("private"))).lookup("alpha", "1.0")
    assert missing.error and "401" in missing.error


def test_credentials_from_netrc(tmp_path: Path, seen: li.LocalIndex) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login user password s3cr%t\n")
    netrc.chmod(0o600)
    res = IndexClient(settings(tmp_path, seen.url("private"))).lookup("alpha", "1.0")
    assert res.ok, res.error


def test_first_index_that_has_the_version_wins(tmp_path: Path, seen: li.LocalIndex) -> None:
    primary, extra = seen.url("simple"), seen.url("extra")
    found = IndexClient(settings(tmp_path, primary, extra)).lookup_many(
        [("alpha", "1.0"), ("beta", "2.0"), ("nowhere", "1.0")])
    assert found[("alpha", "1.0")].index_url == primary and len(found[("alpha", "1.0")].files) == 2
    assert found[("beta", "2.0")].index_url == extra and found[("beta", "2.0")].ok
    assert found[("nowhere", "1.0")].error == f"not found on {primary}; not found on {extra}"
    # The other way round, the extra's single sdist is the answer.
    swapped = IndexClient(settings(tmp_path / "swap", extra, primary)).lookup("alpha", "1.0")
    assert swapped.index_url == extra and len(swapped.files) == 1


def test_a_failing_primary_does_not_fall_through_to_an_extra(tmp_path: Path, seen: li.LocalIndex) -> None:
    res = IndexClient(settings(tmp_path, seen.url("broken"), seen.url("extra"))).lookup("beta", "2.0")
    assert not res.files and res.error == f"HTTP 500 from {seen.url('broken')} for beta"


def test_unreachable_index_is_a_result_not_an_exception(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    url = f"http://127.0.0.1:{port}/simple"
    res = IndexClient(settings(tmp_path, url)).lookup("alpha", "1.0")
    assert not res.files and res.error and res.error.startswith(f"cannot reach {url}")


def test_redact_url() -> None:
    assert redact_url("https://user:pw@host.example/simple") == "https://host.example/simple"
    assert redact_url("https://token@host.example:8443/simple/") == "https://host.example:8443/simple/"
    assert redact_url("https://pypi.org/simple") == "https://pypi.org/simple"


# ---------------------------------------------------------------------------------------------
# The real PyPI, for the distributions of the dev venv


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(), reason="pypi.org is not reachable from here")


@needs_pypi
def test_dev_venv_lookup_on_pypi_cold_then_warm(tmp_path: Path) -> None:
    dists = [d for d in installed() if d["kind"] == "index"]
    pins = [(d["name"], d["version"]) for d in dists]
    assert any(name == "tensorflow-cpu" or name == "tensorflow" for name, _ in pins)
    # The public index whatever the machine's index variables say; its CA bundle and proxy
    # settings still apply.
    environ = {k: v for k, v in os.environ.items()
               if k.upper() in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "NO_PROXY")}
    s = Settings(home=tmp_path / "home", config_dir=tmp_path / "config", environ=environ)
    t0 = time.perf_counter()
    cold = IndexClient(s).lookup_many(pins)
    t1 = time.perf_counter()
    warm = IndexClient(s.with_(offline=True)).lookup_many(pins)
    t2 = time.perf_counter()
    print(f"\nPyPI, dev venv ({len(pins)} distributions): cold {t1 - t0:.3f}s, warm {t2 - t1:.4f}s")
    assert {k: r.error for k, r in cold.items() if r.error} == {}
    assert warm == cold
    for (name, _), r in cold.items():
        assert r.index_url == "https://pypi.org/simple"
        assert r.files, name
        assert all(len(f.sha256) == 64 and f.url.startswith("https://") for f in r.files)
