"""The one place envlock speaks HTTP: package-index pages and the files `save --vendor` copies.

Built on urllib3 (already in every TensorFlow environment, through requests): pooled keep-alive
connections shared by threads, gzip, redirects, and retries of a refused or failed connection and
of 429/5xx answers. Timeouts are not retried, so ``ENVLOCK_HTTP_TIMEOUT`` stays the longest a
silent server can hold a request.

This module also is the one place that knows the package indexes and their credentials: their
URLs come from :class:`Settings`, credentials from the URL's user-info or ``~/.netrc``, and only
the redacted URL is ever shown, stored or cached. Proxies (``http_proxy``, ``https_proxy``,
``no_proxy``) and CA bundles (``PIP_CERT``, ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``) come from
the settings' environment. Certificates otherwise come from OpenSSL's default store, which on
Linux is the system's; truststore is not used (it needs Python 3.10, and on Linux it would read
that same store).

Requests run on daemon threads (:func:`map_on_daemons`, :func:`in_background`): a Ctrl-C or
SIGTERM never waits for a request in flight, not even at interpreter exit, which joins the
threads of ``concurrent.futures``.
"""

from __future__ import annotations

import base64
import hashlib
import netrc
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ResponseError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.util.retry import Retry

from envlock import __version__
from envlock.settings import Settings

USER_AGENT = f"envlock/{__version__}"
MAX_REDIRECTS = 5
RETRIES = 2  # after the first try: a refused or dropped connection, or a 429/5xx answer
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 20

T = TypeVar("T")
R = TypeVar("R")


class _Retry(Retry):
    """Retries a refused connection and one the server dropped (a kept-alive one it had
    closed, say), but no timeout: that would multiply ENVLOCK_HTTP_TIMEOUT."""

    def _is_connection_error(self, err: Exception) -> bool:
        if isinstance(err, ProxyError) and err.original_error is not None:
            err = err.original_error
        return isinstance(err, NewConnectionError)  # urllib3 raises ConnectTimeoutError on timeout

    def _is_read_error(self, err: Exception) -> bool:
        return isinstance(err, ProtocolError)


class HttpFailure(Exception):
    """A request that got no usable answer. ``kind`` is one of NetworkError's kinds
    ("refused", "timeout", "http", "dns", "tls", "network"); ``detail`` says what happened
    without naming the URL, which the caller phrases (redacted) with :meth:`describe`."""

    def __init__(self, detail: str, kind: str = "network", *, timeout: float = 0.0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.kind = kind
        self.timeout = timeout

    def describe(self, where: str) -> str:
        if self.kind == "timeout":
            return f"timed out after {self.timeout:g}s reaching {where}"
        if self.kind == "tls":
            return f"TLS error reaching {where}: {self.detail}"
        if self.kind == "http":
            return f"{self.detail} from {where}"
        return f"cannot reach {where}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# Indexes and credentials


def redact_url(url: str) -> str:
    """``url`` without its user-info part, fit for a lock file, a cache key or a message.

    The whole user-info goes, not just the password: a lone user name is often a token.
    An installer reading the lock finds the credentials again in its keyring or netrc.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class IndexSource:
    """One configured package index: what is shown of it, and what is sent to it."""

    url: str  # redacted, no trailing slash: what results and caches show
    auth: str | None  # an Authorization header value, sent only to ``host``
    host: str
    cache_key: str

    @classmethod
    def parse(cls, raw: str, environ: Mapping[str, str]) -> IndexSource:
        parts = urlsplit(raw.strip())
        shown = redact_url(raw.strip()).rstrip("/")
        host = parts.hostname or ""
        auth = None
        if parts.username is not None:
            auth = _basic(unquote(parts.username), unquote(parts.password or ""))
        elif host:
            auth = _netrc_auth(host, environ)
        digest = hashlib.sha256(shown.encode()).hexdigest()[:16]
        label = re.sub(r"[^A-Za-z0-9.-]", "_", host or "index")
        return cls(url=shown, auth=auth, host=host, cache_key=f"{label}-{digest}")

    def page_url(self, name: str) -> str:
        return f"{self.url}/{name}/"


def index_sources(settings: Settings) -> tuple[IndexSource, ...]:
    """The configured indexes in the order they are asked (primary, then extras), once each."""
    environ = settings.environ or os.environ
    return tuple(IndexSource.parse(u, environ) for u in dict.fromkeys(settings.index_urls))


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
    return _basic(login, password or "")


# ---------------------------------------------------------------------------------------------
# The client


def _ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    # pip's, requests' and OpenSSL's own variables, in the order pip users expect.
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = environ.get(var)
        if value and os.path.isfile(value):
            return ssl.create_default_context(cafile=value)
        if value and os.path.isdir(value):
            return ssl.create_default_context(capath=value)
    return ssl.create_default_context()


def _proxy_setting(environ: Mapping[str, str], scheme: str) -> str:
    return environ.get(f"{scheme}_proxy") or environ.get(f"{scheme.upper()}_PROXY") or ""


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """curl's and requests' reading of no_proxy: "*", or a host or domain suffix per entry."""
    host = host.lower()
    for entry in (e.strip().lower() for e in no_proxy.replace(" ", ",").split(",")):
        if entry == "*":
            return True
        entry = entry.lstrip(".").split(":")[0]
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    url: str  # after redirects


class HttpClient:
    """GET over pooled connections, with the credentials of the configured indexes.

    Safe to share between threads. Credentials go to an index's own host only: urllib3 drops
    the Authorization header when a redirect leaves that host.
    """

    def __init__(self, settings: Settings, *, timeout: float | None = None) -> None:
        environ = settings.environ or os.environ
        self.timeout = settings.http_timeout if timeout is None else timeout
        self._auth: dict[str, str] = {}
        for source in index_sources(settings):
            if source.auth and source.host:
                self._auth.setdefault(source.host, source.auth)
        self._retry = _Retry(total=RETRIES, connect=RETRIES, read=RETRIES, status=RETRIES, other=0,
                            redirect=MAX_REDIRECTS, status_forcelist=RETRY_STATUSES,
                            allowed_methods=frozenset({"GET"}), backoff_factor=0.25,
                            raise_on_status=False, respect_retry_after_header=False)
        common = {"num_pools": 32, "maxsize": 16, "ssl_context": _ssl_context(environ),
                  "timeout": urllib3.Timeout(connect=self.timeout, read=self.timeout),
                  "retries": self._retry}
        self._direct = urllib3.PoolManager(**common)  # type: ignore[arg-type]
        self._no_proxy = _proxy_setting(environ, "no")
        self._proxied: dict[str, urllib3.PoolManager] = {}
        for scheme in ("http", "https"):
            proxy = _proxy_setting(environ, scheme)
            if proxy:
                p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
                headers = {}
                if p.username is not None:
                    headers["Proxy-Authorization"] = _basic(unquote(p.username), unquote(p.password or ""))
                bare = urlunsplit(p._replace(netloc=p.netloc.rpartition("@")[2]))
                self._proxied[scheme] = urllib3.ProxyManager(bare, proxy_headers=headers, **common)  # type: ignore[arg-type]

    def close(self) -> None:
        for manager in (self._direct, *self._proxied.values()):
            manager.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _manager(self, scheme: str, host: str) -> urllib3.PoolManager:
        proxied = self._proxied.get(scheme)
        if proxied is None or bypasses_proxy(host, self._no_proxy):
            return self._direct
        return proxied

    def _open(self, url: str, headers: Mapping[str, str], *, stream: bool,
              auth: str | None = None) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise HttpFailure(f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)}")
        sent = {"User-Agent": USER_AGENT, **headers}
        auth = auth or self._auth.get(parts.hostname or "")
        if auth and parts.hostname:
            sent["Authorization"] = auth
        try:
            return self._manager(parts.scheme, parts.hostname or "").request(
                "GET", redact_url(url), headers=sent, preload_content=not stream)
        except HTTPError as exc:
            raise self._failure(exc) from exc

    def get(self, url: str, headers: Mapping[str, str] | None = None, *, auth: str | None = None) -> Response:
        """The whole answer, whatever its status (after retries of 429/5xx)."""
        resp = self._open(url, headers or {}, stream=False, auth=auth)
        return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.data,
                        urljoin(url, resp.url or url))

    def download(self, url: str, out: BinaryIO, on_block: Callable[[bytes], None] | None = None) -> None:
        """Streams the body of a 200 answer into ``out``; anything else raises HttpFailure."""
        resp = self._open(url, {}, stream=True)
        try:
            if resp.status != 200:
                raise HttpFailure(f"HTTP {resp.status}", "http")
            for block in resp.stream(_CHUNK):
                if on_block is not None:
                    on_block(block)
                out.write(block)
        except HTTPError as exc:
            raise self._failure(exc) from exc
        finally:
            resp.release_conn()

    def _failure(self, exc: BaseException) -> HttpFailure:
        if isinstance(exc, MaxRetryError):
            if isinstance(exc.reason, ResponseError) or exc.reason is None:
                return HttpFailure("too many redirects")
            exc = exc.reason
        if isinstance(exc, ProxyError) and exc.original_error is not None:
            exc = exc.original_error
        root = _root_os_error(exc)
        if isinstance(exc, NameResolutionError) or isinstance(root, socket.gaierror):
            return HttpFailure(_strerror(root or exc), "dns")
        if isinstance(exc, NewConnectionError):
            kind = "refused" if isinstance(root, ConnectionRefusedError) else "network"
            if isinstance(root, (socket.timeout, TimeoutError)):
                return HttpFailure("timed out", "timeout", timeout=self.timeout)
            return HttpFailure(_strerror(root or exc), kind)
        if isinstance(exc, (Urllib3TimeoutError, socket.timeout, TimeoutError)):
            return HttpFailure("timed out", "timeout", timeout=self.timeout)
        if isinstance(exc, Urllib3SSLError):
            return HttpFailure(str(getattr(root, "reason", None) or exc), "tls")
        return HttpFailure(_strerror(root or exc))


def _root_os_error(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    found: OSError | None = None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and not isinstance(cur, HTTPError):
            found = cur
        cur = cur.__cause__ or cur.__context__
    return found


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Daemon threads


def map_on_daemons(fn: Callable[[T], R], items: Sequence[T], max_workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` daemon threads, in order.

    An interrupt of the waiting thread (Ctrl-C) stops handing out items and leaves the
    threads behind instead of joining requests in flight. An exception of ``fn`` is raised
    here once every thread has stopped taking items.
    """
    if not items:
        return []
    results: list[R | None] = [None] * len(items)
    pending: Iterator[tuple[int, T]] = iter(enumerate(items))
    lock = threading.Lock()
    done = threading.Event()
    stop = threading.Event()
    left = [len(items)]
    errors: list[BaseException] = []

    def work() -> None:
        while not stop.is_set():
            with lock:
                nxt = next(pending, None)
            if nxt is None:
                return
            try:
                results[nxt[0]] = fn(nxt[1])
            except BaseException as exc:  # handed to the waiting thread
                errors.append(exc)
                stop.set()
                done.set()
                return
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    for i in range(max(1, min(max_workers, len(items)))):
        threading.Thread(target=work, name=f"envlock-http-{i}", daemon=True).start()
    try:
        done.wait()
    finally:
        stop.set()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def in_background(fn: Callable[..., R], *args: object) -> Future[R]:
    """``fn(*args)`` on a daemon thread; its Future's ``result()`` waits interruptibly."""
    future: Future[R] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=run, name="envlock-background", daemon=True).start()
    return future
