"""Where an installer takes packages from, as the flags pip and ``uv pip`` both understand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def find_links_entry(link: Path | str) -> str:
    """A find-links entry: URLs as given, local paths made absolute (the child's cwd differs)."""
    text = str(link)
    return text if "://" in text else str(Path(text).absolute())


def index_options(index_urls: Sequence[str], find_links: Sequence[Path | str], *,
                  no_index: bool) -> list[str]:
    """``--no-index``, or the first index URL as the index and the others as extra ones; then
    every ``--find-links``."""
    opts: list[str] = []
    if no_index:
        opts.append("--no-index")
    elif index_urls:
        opts += ["--index-url", index_urls[0]]
        for extra in index_urls[1:]:
            opts += ["--extra-index-url", extra]
    for link in find_links:
        opts += ["--find-links", find_links_entry(link)]
    return opts


__all__ = ["find_links_entry", "index_options"]
