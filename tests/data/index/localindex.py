"""A real package index on 127.0.0.1 for the tests: PEP 691 JSON and PEP 503 HTML pages,
content negotiation, ETags, gzip, basic auth, and the files themselves.

Wheels and sdists are built by hand here (a wheel is a zip with METADATA, WHEEL and RECORD),
so they install for real with uv and pip, in milliseconds.

Loaded by path from the test modules (see ``load_localindex`` there); not a package.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import html
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def _norm(name: str) -> str:
    return name.replace("-", "_").lower()


def write_wheel(dest: Path, name: str, version: str, files: Mapping[str, str | bytes], *,
                requires: tuple[str, ...] = (), metadata: Mapping[str, str] | None = None) -> Path:
    """A pure-Python wheel of ``files`` (path in the wheel: text or bytes), with METADATA, WHEEL,
    RECORD and the extra ``.dist-info`` files in ``metadata`` (``entry_points.txt``, ...)."""
    dist = _norm(name)
    info = f"{dist}-{version}.dist-info"
    data = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    data[f"{info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    ).encode()
    data[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: envlock-tests\n"
                             b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    data.update({f"{info}/{k}": v.encode() for k, v in (metadata or {}).items()})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for path, body in data.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(body)])
    writer.writerow([f"{info}/RECORD", "", ""])
    data[f"{info}/RECORD"] = out.getvalue().encode()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, body in data.items():
            # A fixed date keeps the bytes (and so the hash) the same from run to run.
            zf.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), body)
    return path


def build_wheel(dest: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal, installable pure-Python wheel holding one module ``<name>``."""
    return write_wheel(dest, name, version, {f"{_norm(name)}/__init__.py": f"__version__ = {version!r}\n"},
                       requires=requires)


def build_sdist(dest: Path, name: str, version: str) -> Path:
    dist = _norm(name)
    root = f"{dist}-{version}"
    path = dest / f"{root}.tar.gz"
    pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    with tarfile.open(path, "w:gz") as tf:
        ti = tarfile.TarInfo(f"{root}/PKG-INFO")
        ti.size = len(pkg_info)
        tf.addfile(ti, io.BytesIO(pkg_info))
    return path


@dataclass
class Listed:
    """One file as an index lists it; ``path`` None for a listing-only (synthetic) entry."""

    filename: str
    sha256: str
    size: int
    path: Path | None = None
    yanked: bool | str = False
    requires_python: str | None = None
    upload_time: str | None = "2024-01-02T03:04:05.123456Z"

    @classmethod
    def of(cls, path: Path, **kw: Any) -> Listed:
        data = path.read_bytes()
        return cls(path.name, hashlib.sha256(data).hexdigest(), len(data), path, **kw)


@dataclass
class IndexConfig:
    projects: dict[str, list[Listed]] = field(default_factory=dict)
    html_only: bool = False  # an index that ignores Accept and always answers PEP 503 HTML
    auth: str | None = None  # "user:password" required
    status: int | None = None  # answer every page with this status
    etag: bool = True


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    status: int = 0
    content_type: str = ""
    gzipped: bool = False


class LocalIndex:
    def __init__(self) -> None:
        self.indexes: dict[str, IndexConfig] = {}
        self.files: dict[str, Path] = {}
        self.requests: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"index": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, index: str, *, userinfo: str = "") -> str:
        root = self.root.replace("://", f"://{userinfo}@") if userinfo else self.root
        return f"{root}/{index}/simple"

    def add(self, index: str, project: str, *listed: Listed) -> None:
        cfg = self.indexes.setdefault(index, IndexConfig())
        cfg.projects.setdefault(project, []).extend(listed)
        for f in listed:
            if f.path is not None:
                self.files[f.filename] = f.path

    def pages_seen(self) -> list[Seen]:
        return [r for r in self.requests if not r.path.startswith("/files/")]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection reuse is exercised
    index: LocalIndex

    def setup(self) -> None:
        super().setup()
        with self.index._lock:
            self.index.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, seen: Seen, status: int, body: bytes = b"",
              headers: dict[str, str] | None = None) -> None:
        seen.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.index._lock:
            self.index.requests.append(seen)
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "files" and len(parts) == 2 and parts[1] in self.index.files:
            self._send(seen, 200, self.index.files[parts[1]].read_bytes(),
                       {"Content-Type": "application/octet-stream"})
            return
        cfg = self.index.indexes.get(parts[0])
        if cfg is None or len(parts) != 3 or parts[1] != "simple":
            self._send(seen, 404)
            return
        if cfg.auth is not None:
            expected = "Basic " + base64.b64encode(cfg.auth.encode()).decode()
            if seen.headers.get("authorization") != expected:
                self._send(seen, 401, b"", {"WWW-Authenticate": 'Basic realm="test"'})
                return
        if cfg.status is not None:
            self._send(seen, cfg.status)
            return
        listed = cfg.projects.get(parts[2])
        if listed is None:
            self._send(seen, 404)
            return
        wants_json = JSON_TYPE in seen.headers.get("accept", "") and not cfg.html_only
        if wants_json:
            body = json.dumps({
                "meta": {"api-version": "1.1"},
                "name": parts[2],
                "files": [{
                    "filename": f.filename,
                    "url": f"/files/{f.filename}",  # relative on purpose: the client must join
                    "hashes": {"sha256": f.sha256},
                    "requires-python": f.requires_python,
                    "size": f.size,
                    "upload-time": f.upload_time,
                    "yanked": f.yanked,
                } for f in listed],
            }).encode()
            ctype = JSON_TYPE
        else:
            links = []
            for f in listed:
                attrs = ""
                if f.requires_python:
                    attrs += f' data-requires-python="{html.escape(f.requires_python)}"'
                if f.yanked is not False:
                    reason = f.yanked if isinstance(f.yanked, str) else ""
                    attrs += f' data-yanked="{html.escape(reason)}"'
                href = f"../../../files/{f.filename}#sha256={f.sha256}"  # relative: joined by the client
                links.append(f'<a href="{href}"{attrs}>{f.filename}</a><br/>')
            body = ("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n").encode()
            ctype = "text/html"
        seen.content_type = ctype
        headers = {"Content-Type": ctype}
        if cfg.etag:
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            headers["ETag"] = etag
            if seen.headers.get("if-none-match") == etag:
                self._send(seen, 304, b"", {"ETag": etag})
                return
        if "gzip" in seen.headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
            seen.gzipped = True
        self._send(seen, 200, body, headers)
