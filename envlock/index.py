"""Hashes of every file of pinned distributions, from package indexes.

Speaks the PEP 691 JSON simple API and falls back to PEP 503 HTML when an index answers
HTML. Standard library HTTP only: one persistent connection per thread and host, gzip
accepted, basic auth from the index URL (or ~/.netrc), proxies and CA bundles from the
usual variables.

Two disk caches under ``Settings.hash_cache``:

* ``versions/``: the answer for one (index, name, version), kept for good. The files of a
  released version keep their hashes (indexes refuse re-uploads), so a warm look-up never
  touches the network.
* ``pages/``: the project page itself with its ETag / Last-Modified, revalidated when a
  version is not in the first cache, and used as a stale fallback when offline.

Writes go to a temporary file that is renamed into place, so concurrent processes only ever
see whole files. Failures never raise: the :class:`LookupResult` carries the reason.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import logging
import netrc
import os
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from envlock import __version__
from envlock.fs import atomic_write
from envlock.settings import Settings

log = logging.getLogger("envlock.index")

JSON_CONTENT_TYPE = "application/vnd.pypi.simple.v1+json"
# PEP 691's recommended preference: JSON, then the versioned HTML, then legacy HTML.
ACCEPT = f"{JSON_CONTENT_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
USER_AGENT = f"envlock/{__version__}"
CACHE_LAYOUT = "v1"
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class DistFile:
    """One file (wheel or sdist) of a release, as the index lists it."""

    filename: str
    url: str
    sha256: str
    size: int | None = None
    upload_time: str | None = None
    yanked: bool = False
    requires_python: str | None = None

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DistFile:
        return cls(
            filename=str(data["filename"]),
            url=str(data["url"]),
            sha256=str(data["sha256"]),
            size=data.get("size"),
            upload_time=data.get("upload_time"),
            yanked=bool(data.get("yanked", False)),
            requires_python=data.get("requires_python"),
        )


@dataclass(frozen=True)
class LookupResult:
    """The files of ``name==version`` on the first index that has that version.

    ``index_url`` is redacted (no credentials). On failure ``files`` is empty and ``error``
    says why: ``"offline"``, ``"not found on <index>"``, or the network problem.
    """

    name: str
    version: str
    index_url: str | None
    files: tuple[DistFile, ...]
    error: str | None = None
    # Why it failed, for a caller that must tell the user what to do: "absent" (the index
    # answered without that version), "offline", or a network kind of NetworkError
    # ("refused", "timeout", "http", "dns", "tls", "network").
    error_kind: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.files)

    @property
    def hashes(self) -> tuple[str, ...]:
        return tuple(sorted({f.sha256 for f in self.files}))


def redact_url(url: str) -> str:
    """``url`` without its user-info part, fit for a lock file, a cache key or a message.

    The whole user-info goes, not just the password: a lone user name is often a token.
    An installer reading the lock finds the credentials again in its keyring or netrc.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# ---------------------------------------------------------------------------------------------
# Indexes and HTTP


class _Absent(Exception):
    """The index answered and does not have the project (404/410)."""


class _Failure(Exception):
    """The index could not be asked: network, TLS, auth, server error, unreadable page."""

    def __init__(self, message: str, kind: str = "network") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class _Index:
    url: str  # redacted, no trailing slash: what results and caches show
    auth: str | None  # an Authorization header value, sent only to ``host``
    host: str
    cache_key: str

    @classmethod
    def parse(cls, raw: str, environ: Mapping[str, str]) -> _Index:
        parts = urlsplit(raw.strip())
        shown = redact_url(raw.strip()).rstrip("/")
        host = parts.hostname or ""
        auth = None
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = "Basic " + base64.b64encode(cred.encode()).decode("ascii")
        elif host:
            auth = _netrc_auth(host, environ)
        digest = hashlib.sha256(shown.encode()).hexdigest()[:16]
        label = re.sub(r"[^A-Za-z0-9.-]", "_", host or "index")
        return cls(url=shown, auth=auth, host=host, cache_key=f"{label}-{digest}")

    def page_url(self, name: str) -> str:
        return f"{self.url}/{name}/"


def _netrc_auth(host: str, environ: Mapping[str, str]) -> str | None:
    # pip reads ~/.netrc too; it keeps credentials out of URLs, settings and lock files.
    path = environ.get("NETRC") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        found = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    if not found:
        return None
    login, _, password = found
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")


def _ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    # pip's, requests' and OpenSSL's own variables, in the order pip users expect.
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = environ.get(var)
        if value and os.path.isfile(value):
            return ssl.create_default_context(cafile=value)
        if value and os.path.isdir(value):
            return ssl.create_default_context(capath=value)
    return ssl.create_default_context()


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for scheme in ("http", "https", "no"):
        value = environ.get(f"{scheme}_proxy") or environ.get(f"{scheme.upper()}_PROXY")
        if value:
            out[scheme] = value
    return out


def _bypasses_proxy(host: str, no_proxy: str) -> bool:
    # curl's and requests' reading of no_proxy: "*", or a host or domain suffix per entry.
    host = host.lower()
    for entry in (e.strip().lower() for e in no_proxy.replace(" ", ",").split(",")):
        if entry == "*":
            return True
        entry = entry.lstrip(".").split(":")[0]
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    url: str


class _Http:
    """GET with one keep-alive connection per (thread, scheme, host, port).

    urllib opens a new connection (and TLS handshake) per request; for ~60 project pages
    that is most of the cold look-up time.
    """

    def __init__(self, timeout: float, environ: Mapping[str, str]) -> None:
        self._timeout = timeout
        self._context = _ssl_context(environ)
        self._proxies = _proxies(environ)
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()

    def _pool(self) -> dict[tuple[str, str, int], http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _proxy_for(self, scheme: str, host: str) -> str | None:
        proxy = self._proxies.get(scheme)
        if not proxy or _bypasses_proxy(host, self._proxies.get("no", "")):
            return None
        return proxy

    def _connect(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        proxy = self._proxy_for(scheme, host)
        conn: http.client.HTTPConnection
        if proxy:
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            headers = {}
            if p.username is not None:
                cred = f"{unquote(p.username)}:{unquote(p.password or '')}"
                headers["Proxy-Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
            if scheme == "https":
                conn = http.client.HTTPSConnection(p.hostname or "", p.port or 8080,
                                                   timeout=self._timeout, context=self._context)
                conn.set_tunnel(host, port, headers=headers)
            else:
                conn = http.client.HTTPConnection(p.hostname or "", p.port or 8080, timeout=self._timeout)
        elif scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        with self._lock:
            self._opened.append(conn)
        return conn

    def get(self, url: str, headers: Mapping[str, str], *, auth: str | None, auth_host: str) -> _Response:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise _Failure(f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)}")
            sent = dict(headers)
            # Credentials go to the index's own host only, never to where it redirects.
            if auth and parts.hostname == auth_host:
                sent["Authorization"] = auth
            resp = self._request(parts.scheme, parts.hostname or "", parts.port, url, sent)
            location = resp.headers.get("location")
            if resp.status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            return resp
        raise _Failure(f"too many redirects from {redact_url(url)}")

    def _request(self, scheme: str, host: str, port: int | None, url: str,
                 headers: dict[str, str]) -> _Response:
        port = port or (443 if scheme == "https" else 80)
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if scheme == "http" and self._proxy_for(scheme, host):
            target = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], fragment=""))
        headers.setdefault("Host", parts.netloc.rpartition("@")[2])
        pool = self._pool()
        key = (scheme, host, port)
        for attempt in (0, 1):
            conn = pool.get(key)
            reused = conn is not None
            if conn is None:
                conn = pool[key] = self._connect(scheme, host, port)
            try:
                conn.request("GET", target, headers=headers)
                raw = conn.getresponse()
                body = raw.read()
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                    http.client.BadStatusLine, http.client.CannotSendRequest) as exc:
                conn.close()
                pool.pop(key, None)
                # A kept-alive connection the server has since closed: one fresh retry.
                if reused and attempt == 0:
                    continue
                raise _Failure(f"connection to {host} lost: {exc or type(exc).__name__}") from exc
            except BaseException:
                conn.close()
                pool.pop(key, None)
                raise
            hdrs = {k.lower(): v for k, v in raw.getheaders()}
            if raw.will_close:
                conn.close()
                pool.pop(key, None)
            encoding = hdrs.get("content-encoding", "").lower()
            try:
                if encoding in ("gzip", "x-gzip"):
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
            except (OSError, zlib.error, EOFError) as exc:
                raise _Failure(f"corrupt {encoding} body from {redact_url(url)}: {exc}") from exc
            return _Response(raw.status, hdrs, body, url)
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Project pages


@dataclass(frozen=True)
class _Page:
    """A project page: its file entries in PEP 691's shape, and the URL they are relative to.

    Entries stay as parsed (plain dicts): a page lists thousands of files and only a handful
    match a pin, so URL joining and filename parsing wait until :func:`_select`.
    """

    url: str
    entries: list[dict[str, Any]]


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.anchors: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.anchors.append(dict(attrs))
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")


def _parse_html(body: bytes, page_url: str) -> _Page:
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url
    entries: list[dict[str, Any]] = []
    for a in parser.anchors:
        href = a.get("href")
        if not href:
            continue
        url, _, fragment = href.partition("#")
        hashes = {}
        for part in fragment.split("&"):
            algo, _, value = part.partition("=")
            if algo and value:
                hashes[algo] = value
        entries.append({
            "filename": unquote(urlsplit(url).path.rsplit("/", 1)[-1]),
            "url": url,
            "hashes": hashes,
            # The attribute's presence marks a yank; its value (maybe empty) is the reason.
            "yanked": a["data-yanked"] or True if "data-yanked" in a else False,
            "requires-python": a.get("data-requires-python"),
        })
    return _Page(base, entries)


def _parse_json(body: bytes, page_url: str) -> _Page:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise _Failure(f"unreadable JSON page at {redact_url(page_url)}: {exc}") from exc
    if not isinstance(data, dict):
        raise _Failure(f"unreadable JSON page at {redact_url(page_url)}: not an object")
    api = str((data.get("meta") or {}).get("api-version", "1.0"))
    if api.split(".")[0] != "1":
        raise _Failure(f"{redact_url(page_url)} speaks simple API {api}, envlock knows 1.x")
    files = data.get("files")
    return _Page(page_url, files if isinstance(files, list) else [])


def _parse_page(body: bytes, content_type: str, page_url: str) -> _Page:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == JSON_CONTENT_TYPE or ctype.endswith("json"):
        return _parse_json(body, page_url)
    return _parse_html(body, page_url)


def _quick_version(filename: str) -> str | None:
    # The version part of a file name, cheaply; the full packaging parse is kept for the
    # few files whose version matches.
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return parts[1] if len(parts) in (5, 6) else None
    if filename.endswith(".tar.gz"):
        return filename[:-7].rpartition("-")[2] or None
    if filename.endswith(".zip"):
        return filename[:-4].rpartition("-")[2] or None
    return None


def _select(page: _Page, name: str, target: Version) -> tuple[tuple[DistFile, ...], bool]:
    """The files of ``name==target`` on ``page``, and whether some matched without a sha256."""
    parsed: dict[str, Version | None] = {}
    out: list[DistFile] = []
    unhashed = False
    for entry in page.entries:
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(filename, str):
            continue
        vstr = _quick_version(filename)
        if vstr is None:
            continue
        version = parsed.get(vstr, False)
        if version is False:
            try:
                version = parsed[vstr] = Version(vstr)
            except InvalidVersion:
                version = parsed[vstr] = None
        if version != target:
            continue
        try:
            if filename.endswith(".whl"):
                fname, fversion, _, _ = parse_wheel_filename(filename)
            else:
                fname, fversion = parse_sdist_filename(filename)
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
            continue
        url = entry.get("url")
        if fname != name or fversion != target or not isinstance(url, str):
            continue
        sha256 = (entry.get("hashes") or {}).get("sha256")
        if not isinstance(sha256, str) or not sha256:
            unhashed = True
            continue
        yanked = entry.get("yanked", False)
        size = entry.get("size")
        upload_time = entry.get("upload-time")
        requires_python = entry.get("requires-python")
        out.append(DistFile(
            filename=filename,
            # Relative links are joined to the page; a page fetched with credentials in its
            # URL would hand them on to every file URL, and those go into lock files.
            url=redact_url(urljoin(page.url, url)),
            sha256=sha256.lower(),
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            upload_time=upload_time if isinstance(upload_time, str) else None,
            yanked=yanked is not False and yanked is not None,
            requires_python=requires_python if isinstance(requires_python, str) else None,
        ))
    out.sort(key=lambda f: f.filename)
    return tuple(out), unhashed


# ---------------------------------------------------------------------------------------------
# Disk cache


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        # A cache that cannot be written (read-only home, full disk) only costs speed.
        log.debug("index cache: could not write %s: %s", path, exc)


_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9.+!_-]")


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root / CACHE_LAYOUT

    def _version_path(self, index: _Index, name: str, version: str) -> Path:
        return self.root / index.cache_key / "versions" / name / f"{_UNSAFE_PATH.sub('_', version)}.json"

    def _page_path(self, index: _Index, name: str) -> Path:
        return self.root / index.cache_key / "pages" / f"{name}.page"

    def get_version(self, index: _Index, name: str, version: str) -> tuple[DistFile, ...] | None:
        try:
            with open(self._version_path(index, name, version), "rb") as fh:
                data = json.loads(fh.read())
            return tuple(DistFile.from_json(f) for f in data["files"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("index cache: ignoring unreadable entry for %s %s: %s", name, version, exc)
            return None

    def put_version(self, index: _Index, name: str, version: str, files: Sequence[DistFile]) -> None:
        data = {"index": index.url, "name": name, "version": version,
                "files": [f.to_json() for f in files]}
        _atomic_write(self._version_path(index, name, version),
                      json.dumps(data, separators=(",", ":")).encode())

    def get_page(self, index: _Index, name: str) -> tuple[dict[str, Any], bytes] | None:
        try:
            with open(self._page_path(index, name), "rb") as fh:
                head = fh.readline()
                body = fh.read()
            meta = json.loads(head)
            return (meta, body) if isinstance(meta, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.debug("index cache: ignoring unreadable page of %s: %s", name, exc)
            return None

    def put_page(self, index: _Index, name: str, meta: Mapping[str, Any], body: bytes) -> None:
        # One file, a JSON line of validators then the body: replaced as a whole, so the
        # validators can never describe another body than the one beside them.
        _atomic_write(self._page_path(index, name), json.dumps(dict(meta)).encode() + b"\n" + body)


# ---------------------------------------------------------------------------------------------
# The client


def network_kind(exc: BaseException) -> str:
    """One of NetworkError's kinds for an exception raised while asking an index."""
    if isinstance(exc, _Failure):
        return exc.kind
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    return "network"


def _network_reason(exc: BaseException, index: _Index, timeout: float) -> str:
    if isinstance(exc, _Failure):
        return str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g}s reaching {index.url}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error reaching {index.url}: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"cannot reach {index.url}: {exc.strerror or exc}"
    return f"cannot read {index.url}: {exc}"


class IndexClient:
    """Looks up the files (and their sha256) of pinned distributions on the configured indexes.

    Indexes are asked in order (primary, then extras) and the first that has the version
    wins, as in pip-tools. A definite "not here" (404, or the version missing from the page)
    moves on to the next index; a failure to ask (network, auth) stops there, so that an
    outage of a private primary index cannot quietly lock files from a public extra one.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._environ: Mapping[str, str] = settings.environ or os.environ
        self._indexes = tuple(_Index.parse(u, self._environ) for u in dict.fromkeys(settings.index_urls))
        self._cache = _Cache(settings.hash_cache)

    @property
    def index_urls(self) -> tuple[str, ...]:
        """The indexes asked, in order, redacted."""
        return tuple(i.url for i in self._indexes)

    def lookup(self, name: str, version: str) -> LookupResult:
        return self.lookup_many([(name, version)])[(name, version)]

    def lookup_many(self, pins: Iterable[tuple[str, str]], *,
                    max_workers: int = 16) -> dict[tuple[str, str], LookupResult]:
        """A result for every pin, keyed by the pin exactly as given. Never raises for
        network trouble; warm pins are answered from disk without any network set-up."""
        results: dict[tuple[str, str], LookupResult] = {}
        wanted: dict[str, list[tuple[str, str]]] = {}
        seen: set[tuple[str, str]] = set()
        for pin in pins:
            if pin in seen:
                continue
            seen.add(pin)
            project = str(canonicalize_name(pin[0]))
            hit = self._from_version_cache(project, pin[1])
            if hit is not None:
                results[pin] = hit
            else:
                wanted.setdefault(project, []).append(pin)
        if not wanted:
            return results
        if self._settings.offline:
            for name, keys in wanted.items():
                results.update(self._from_stale_pages(name, keys, "offline"))
            return results
        started = time.perf_counter()
        client = _Http(self._settings.http_timeout, self._environ)
        try:
            workers = max(1, min(max_workers, len(wanted)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="envlock-index") as pool:
                for found in pool.map(lambda item: self._lookup_project(client, *item), wanted.items()):
                    results.update(found)
        finally:
            client.close()
        log.debug("index: %d project page(s) in %.2fs", len(wanted), time.perf_counter() - started)
        return results

    # -- cache paths ------------------------------------------------------------------------

    def _from_version_cache(self, name: str, version: str) -> LookupResult | None:
        key = _cache_version(version)
        # Any index's permanent answer will do, earliest first: the files of one release
        # do not change, and asking an earlier index again would cost the network round trip
        # that a warm look-up must not make.
        for index in self._indexes:
            files = self._cache.get_version(index, name, key)
            if files is not None:
                return LookupResult(name, version, index.url, files)
        return None

    def _from_stale_pages(self, name: str, keys: list[tuple[str, str]],
                          reason: str) -> dict[tuple[str, str], LookupResult]:
        out: dict[tuple[str, str], LookupResult] = {}
        for key in keys:
            out[key] = LookupResult(name, key[1], None, (), reason)
            target = _target(key[1])
            if target is None:
                continue
            for index in self._indexes:
                cached = self._cache.get_page(index, name)
                if cached is None:
                    continue
                meta, body = cached
                try:
                    raw = _parse_page(body, str(meta.get("content_type", "")), str(meta.get("url", "")))
                except _Failure:
                    continue
                files, _ = _select(raw, name, target)
                if files:
                    out[key] = LookupResult(name, key[1], index.url, files)
                    break
        return out

    # -- network ----------------------------------------------------------------------------

    def _lookup_project(self, client: _Http, name: str,
                        keys: list[tuple[str, str]]) -> dict[tuple[str, str], LookupResult]:
        out: dict[tuple[str, str], LookupResult] = {}
        reasons: dict[tuple[str, str], list[str]] = {k: [] for k in keys}
        todo: list[tuple[tuple[str, str], Version]] = []
        for key in keys:
            target = _target(key[1])
            if target is None:
                out[key] = LookupResult(name, key[1], None, (), f"{key[1]!r} is not a PEP 440 version")
            else:
                todo.append((key, target))
        for index in self._indexes:
            if not todo:
                break
            try:
                raw = self._page(client, index, name)
            except _Absent:
                for key, _ in todo:
                    reasons[key].append(f"not found on {index.url}")
                continue
            except Exception as exc:  # every failure becomes a result, never a raise
                reason = _network_reason(exc, index, self._settings.http_timeout)
                log.debug("index: %s: %s", name, reason, exc_info=True)
                stale = self._from_stale_pages(name, [k for k, _ in todo], reason)
                kind = network_kind(exc)
                out.update({k: r if r.ok else replace(r, error_kind=kind) for k, r in stale.items()})
                return out
            left: list[tuple[tuple[str, str], Version]] = []
            for key, target in todo:
                files, unhashed = _select(raw, name, target)
                if files:
                    self._cache.put_version(index, name, _cache_version(key[1]), files)
                    out[key] = LookupResult(name, key[1], index.url, files)
                elif unhashed:
                    reasons[key].append(f"{index.url} lists {name} {key[1]} without sha256 hashes")
                    left.append((key, target))
                else:
                    reasons[key].append(f"version {key[1]} not found on {index.url}")
                    left.append((key, target))
            todo = left
        for key, _ in todo:
            out[key] = LookupResult(name, key[1], None, (), "; ".join(reasons[key]), "absent")
        return out

    def _page(self, client: _Http, index: _Index, name: str) -> _Page:
        url = index.page_url(name)
        headers = {"Accept": ACCEPT, "Accept-Encoding": "gzip", "User-Agent": USER_AGENT}
        cached = self._cache.get_page(index, name)
        if cached is not None:
            meta, _ = cached
            if meta.get("etag"):
                headers["If-None-Match"] = str(meta["etag"])
            if meta.get("last_modified"):
                headers["If-Modified-Since"] = str(meta["last_modified"])
        t0 = time.perf_counter()
        resp = client.get(url, headers, auth=index.auth, auth_host=index.host)
        log.debug("index: GET %s -> %d, %d bytes, %.3fs", url, resp.status, len(resp.body),
                  time.perf_counter() - t0)
        if resp.status == 304 and cached is not None:
            meta, body = cached
            return _parse_page(body, str(meta.get("content_type", "")), str(meta.get("url", url)))
        if resp.status in (404, 410):
            raise _Absent(name)
        if resp.status in (401, 403):
            raise _Failure(f"HTTP {resp.status} from {index.url}: credentials missing or refused", "http")
        if resp.status != 200:
            raise _Failure(f"HTTP {resp.status} from {index.url} for {name}", "http")
        content_type = resp.headers.get("content-type", "")
        final_url = redact_url(resp.url)
        raw = _parse_page(resp.body, content_type, final_url)
        etag, modified = resp.headers.get("etag"), resp.headers.get("last-modified")
        # Without validators a stored page could never be revalidated; the per-version
        # answers are what make the next look-up fast.
        if etag or modified:
            self._cache.put_page(index, name, {"etag": etag, "last_modified": modified,
                                               "content_type": content_type, "url": final_url,
                                               "fetched": time.time()}, resp.body)
        return raw


def _target(version: str) -> Version | None:
    try:
        return Version(version)
    except InvalidVersion:
        return None


def _cache_version(version: str) -> str:
    target = _target(version)
    return str(target) if target is not None else version
