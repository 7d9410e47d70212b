"""PEP 691 JSON and PEP 503 HTML project pages of a package index, and the files they list.

Parsing only: :mod:`envlock.index.lookup` fetches and caches the pages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from envlock.index.client import redact_url

JSON_CONTENT_TYPE = "application/vnd.pypi.simple.v1+json"
# PEP 691's recommended preference: JSON, then the versioned HTML, then legacy HTML.
ACCEPT = f"{JSON_CONTENT_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


class UnreadablePage(Exception):
    """The index answered with a page that cannot be read as a simple-API page."""


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
class Page:
    """A project page: its file entries in PEP 691's shape, and the URL they are relative to.

    Entries stay as parsed (plain dicts): a page lists thousands of files and only a handful
    match a pin, so URL joining and filename parsing wait until :func:`select_files`.
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


def _parse_html(body: bytes, page_url: str) -> Page:
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
    return Page(base, entries)


def _parse_json(body: bytes, page_url: str) -> Page:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UnreadablePage(f"unreadable JSON page at {redact_url(page_url)}: {exc}") from exc
    if not isinstance(data, dict):
        raise UnreadablePage(f"unreadable JSON page at {redact_url(page_url)}: not an object")
    api = str((data.get("meta") or {}).get("api-version", "1.0"))
    if api.split(".")[0] != "1":
        raise UnreadablePage(f"{redact_url(page_url)} speaks simple API {api}, envlock knows 1.x")
    files = data.get("files")
    return Page(page_url, files if isinstance(files, list) else [])


def parse_page(body: bytes, content_type: str, page_url: str) -> Page:
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


def select_files(page: Page, name: str, target: Version) -> tuple[tuple[DistFile, ...], bool]:
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


