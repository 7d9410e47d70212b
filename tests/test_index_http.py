"""envlock.index.client through the index client: proxies and no_proxy, retries, redirects.

Real servers on 127.0.0.1: the local index of tests/data/index, a forwarding HTTP proxy that
answers 503 to the first request for each path, and a server that only redirects.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import load_localindex

from envlock.index.lookup import IndexClient
from envlock.settings import Settings

li = load_localindex()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    files = tmp_path_factory.mktemp("index-files")
    server = li.LocalIndex()
    server.add("simple", "alpha", li.Listed.of(li.build_wheel(files, "alpha", "1.0")))
    yield server
    server.close()


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 running ``handler`` and recording what it saw."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (handler,), {"server_": self}))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FlakyProxy(_Quiet):
    """A forwarding proxy for http:// URLs; the first request for each URL gets a 503."""

    def do_GET(self) -> None:
        self.server_.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if sum(1 for path, _ in self.server_.seen if path == self.path) == 1:
            self._answer(503, {})
            return
        target = urlsplit(self.path)  # a proxy is sent the absolute URL
        conn = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
        skip = {"host", "proxy-authorization", "proxy-connection", "connection"}
        conn.request("GET", target.path, headers={k: v for k, v in self.headers.items()
                                                  if k.lower() not in skip})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        self._answer(resp.status, {k: v for k, v in resp.getheaders()
                                   if k.lower() not in ("content-length", "connection", "transfer-encoding")},
                     body)


class _Redirect(_Quiet):
    target = ""

    def do_GET(self) -> None:
        self.server_.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self._answer(302, {"Location": self.target + self.path})


@pytest.fixture
def proxy() -> Iterator[_Server]:
    server = _Server(_FlakyProxy)
    yield server
    server.close()


def _settings(tmp_path: Path, url: str, **environ: str) -> Settings:
    return Settings(home=tmp_path / "home", config_dir=tmp_path / "config", index_url=url,
                    http_timeout=10.0, environ={"HOME": str(tmp_path), **environ})


def test_a_proxy_from_the_environment_is_used_with_its_credentials_and_retried(
        tmp_path: Path, index: Any, proxy: _Server) -> None:
    index.reset()
    url = index.url("simple")
    s = _settings(tmp_path, url, http_proxy=f"http://me:pw@127.0.0.1:{proxy.port}")
    res = IndexClient(s).lookup("alpha", "1.0")
    assert res.ok, res.error
    pages = [(p, h) for p, h in proxy.seen if p.endswith("/alpha/")]
    # The 503 was retried, through the proxy, with the proxy's credentials.
    assert [p for p, _ in pages] == [f"{url}/alpha/"] * 2
    assert all(h.get("proxy-authorization", "").startswith("Basic ") for _, h in pages)
    assert len(index.pages_seen()) == 1


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "*", "localhost, .example.com,127.0.0.1:9"])
def test_no_proxy_bypasses_the_proxy(tmp_path: Path, index: Any, proxy: _Server, no_proxy: str) -> None:
    index.reset()
    s = _settings(tmp_path, index.url("simple"), HTTP_PROXY=f"127.0.0.1:{proxy.port}", NO_PROXY=no_proxy)
    res = IndexClient(s).lookup("alpha", "1.0")
    assert res.ok, res.error
    assert proxy.seen == [] and len(index.pages_seen()) == 1


def test_a_proxy_that_keeps_failing_is_an_http_error(tmp_path: Path, index: Any) -> None:
    class Down(_Quiet):
        def do_GET(self) -> None:
            self.server_.seen.append((self.path, {}))
            self._answer(503, {})

    down = _Server(Down)
    try:
        s = _settings(tmp_path, index.url("simple"), http_proxy=f"http://127.0.0.1:{down.port}")
        res = IndexClient(s).lookup("alpha", "1.0")
    finally:
        down.close()
    assert res.error == f"HTTP 503 from {index.url('simple')} for alpha"
    assert res.error_kind == "http"
    assert len(down.seen) == 3  # the first try and two retries


def test_a_redirect_is_followed_and_credentials_stay_on_their_host(tmp_path: Path, index: Any) -> None:
    index.reset()
    redirect = _Server(_Redirect)
    # Another host name for the same server: credentials for 127.0.0.1 must not reach it.
    _Redirect.target = index.root.replace("127.0.0.1", "localhost")
    try:
        url = f"http://user:pw@127.0.0.1:{redirect.port}/simple/simple"
        res = IndexClient(_settings(tmp_path, url)).lookup("alpha", "1.0")
    finally:
        redirect.close()
    assert res.ok, res.error
    assert redirect.seen[0][1]["authorization"].startswith("Basic ")
    assert [p.path for p in index.pages_seen()] == ["/simple/simple/alpha/"]
    assert "authorization" not in index.pages_seen()[0].headers
    assert res.files[0].url.startswith(index.root.replace("127.0.0.1", "localhost"))


def test_only_httpclient_speaks_http() -> None:
    """Issue 13: one HTTP stack. (socket stays allowed: ray.py probes a TCP address.)"""
    import ast

    import envlock

    speaking = set()
    for path in Path(envlock.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # url2pathname (lockfiles.py) turns a file: URL into a path, no network.
                modules = [] if [a.name for a in node.names] == ["url2pathname"] else [node.module or ""]
            else:
                continue
            if any(m.split(".")[0] in ("urllib3", "requests", "httpx")
                   or m in ("http.client", "urllib.request") for m in modules):
                speaking.add(path.relative_to(Path(envlock.__file__).parent).as_posix())
    assert speaking == {"index/client.py"}


@pytest.mark.parametrize("listening", [True, False], ids=["read", "connect"])
def test_a_timeout_is_not_retried(tmp_path: Path, listening: bool) -> None:
    """ENVLOCK_HTTP_TIMEOUT bounds a look-up: a server that accepts and never answers (a read
    timeout), and a full accept queue that leaves the handshake unanswered (a connect timeout)."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0 if not listening else 16)
    fillers = []
    if not listening:  # fill the backlog, so that the next handshake goes unanswered
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(silent.getsockname())
            fillers.append(c)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
    s = Settings(home=tmp_path / "home", config_dir=tmp_path / "config", index_url=url,
                 http_timeout=2.0, environ={"HOME": str(tmp_path)})
    try:
        t0 = time.monotonic()
        res = IndexClient(s).lookup("alpha", "1.0")
        took = time.monotonic() - t0
    finally:
        for c in fillers:
            c.close()
        silent.close()
    assert res.error == f"timed out after 2s reaching {url}" and res.error_kind == "timeout"
    assert took < 5.5, f"{took:.1f}s: the timeout was retried"  # three tries take 6 s at least
