"""Hashes of every file of pinned distributions, from package indexes.

Speaks the PEP 691 JSON simple API and falls back to PEP 503 HTML when an index answers
HTML. The requests themselves (connections, proxies, credentials, retries) are
:mod:`envlock.index.client`'s.

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

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.utils import (
    canonicalize_name,
)
from packaging.version import InvalidVersion, Version

from envlock.fs import atomic_write
from envlock.index.client import (
    HttpClient,
    HttpFailure,
    IndexSource,
    index_sources,
    map_on_daemons,
    redact_url,
)
from envlock.index.simpleapi import ACCEPT, DistFile, Page, UnreadablePage, parse_page, select_files
from envlock.settings import Settings

__all__ = ["DistFile", "IndexClient", "LookupResult", "redact_url"]

log = logging.getLogger("envlock.index.lookup")

CACHE_LAYOUT = "v1"


# ---------------------------------------------------------------------------------------------
# Results


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


# ---------------------------------------------------------------------------------------------
# Answers that are not pages


class _Absent(Exception):
    """The index answered and does not have the project (404/410)."""


class _Failure(Exception):
    """The index answered with a refusal or a server error (after retries)."""


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

    def _version_path(self, index: IndexSource, name: str, version: str) -> Path:
        return self.root / index.cache_key / "versions" / name / f"{_UNSAFE_PATH.sub('_', version)}.json"

    def _page_path(self, index: IndexSource, name: str) -> Path:
        return self.root / index.cache_key / "pages" / f"{name}.page"

    def get_version(self, index: IndexSource, name: str, version: str) -> tuple[DistFile, ...] | None:
        try:
            with open(self._version_path(index, name, version), "rb") as fh:
                data = json.loads(fh.read())
            return tuple(DistFile.from_json(f) for f in data["files"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("index cache: ignoring unreadable entry for %s %s: %s", name, version, exc)
            return None

    def put_version(self, index: IndexSource, name: str, version: str, files: Sequence[DistFile]) -> None:
        data = {"index": index.url, "name": name, "version": version,
                "files": [f.to_json() for f in files]}
        _atomic_write(self._version_path(index, name, version),
                      json.dumps(data, separators=(",", ":")).encode())

    def get_page(self, index: IndexSource, name: str) -> tuple[dict[str, Any], bytes] | None:
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

    def put_page(self, index: IndexSource, name: str, meta: Mapping[str, Any], body: bytes) -> None:
        # One file, a JSON line of validators then the body: replaced as a whole, so the
        # validators can never describe another body than the one beside them.
        _atomic_write(self._page_path(index, name), json.dumps(dict(meta)).encode() + b"\n" + body)


# ---------------------------------------------------------------------------------------------
# The client


def _failure_of(exc: BaseException, index: IndexSource) -> tuple[str, str]:
    """(reason, kind) for an exception raised while asking ``index``; kind is one of
    NetworkError's kinds."""
    if isinstance(exc, _Failure):
        return str(exc), "http"
    if isinstance(exc, UnreadablePage):
        return str(exc), "network"
    if isinstance(exc, HttpFailure):
        return exc.describe(index.url), exc.kind
    return f"cannot read {index.url}: {exc}", "network"


class IndexClient:
    """Looks up the files (and their sha256) of pinned distributions on the configured indexes.

    Indexes are asked in order (primary, then extras) and the first that has the version
    wins, as in pip-tools. A definite "not here" (404, or the version missing from the page)
    moves on to the next index; a failure to ask (network, auth) stops there, so that an
    outage of a private primary index cannot quietly lock files from a public extra one.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._indexes = index_sources(settings)
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
        # Daemon threads: a Ctrl-C while pages are in flight is not held up by them.
        with HttpClient(self._settings) as client:
            for found in map_on_daemons(lambda item: self._lookup_project(client, *item),
                                        list(wanted.items()), max_workers):
                results.update(found)
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
                    raw = parse_page(body, str(meta.get("content_type", "")), str(meta.get("url", "")))
                except UnreadablePage:
                    continue
                files, _ = select_files(raw, name, target)
                if files:
                    out[key] = LookupResult(name, key[1], index.url, files)
                    break
        return out

    # -- network ----------------------------------------------------------------------------

    def _lookup_project(self, client: HttpClient, name: str,
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
                reason, kind = _failure_of(exc, index)
                log.debug("index: %s: %s", name, reason, exc_info=True)
                stale = self._from_stale_pages(name, [k for k, _ in todo], reason)
                out.update({k: r if r.ok else replace(r, error_kind=kind) for k, r in stale.items()})
                return out
            left: list[tuple[tuple[str, str], Version]] = []
            for key, target in todo:
                files, unhashed = select_files(raw, name, target)
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

    def _page(self, client: HttpClient, index: IndexSource, name: str) -> Page:
        url = index.page_url(name)
        headers = {"Accept": ACCEPT, "Accept-Encoding": "gzip"}
        cached = self._cache.get_page(index, name)
        if cached is not None:
            meta, _ = cached
            if meta.get("etag"):
                headers["If-None-Match"] = str(meta["etag"])
            if meta.get("last_modified"):
                headers["If-Modified-Since"] = str(meta["last_modified"])
        t0 = time.perf_counter()
        resp = client.get(url, headers, auth=index.auth)
        log.debug("index: GET %s -> %d, %d bytes, %.3fs", url, resp.status, len(resp.body),
                  time.perf_counter() - t0)
        if resp.status == 304 and cached is not None:
            meta, body = cached
            return parse_page(body, str(meta.get("content_type", "")), str(meta.get("url", url)))
        if resp.status in (404, 410):
            raise _Absent(name)
        if resp.status in (401, 403):
            raise _Failure(f"HTTP {resp.status} from {index.url}: credentials missing or refused")
        if resp.status != 200:
            raise _Failure(f"HTTP {resp.status} from {index.url} for {name}")
        content_type = resp.headers.get("content-type", "")
        final_url = redact_url(resp.url)
        raw = parse_page(resp.body, content_type, final_url)
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

