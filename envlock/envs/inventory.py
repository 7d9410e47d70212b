"""What an environment holds, and whether that is exactly what a lock pins.

The listing runs in the environment's own interpreter (``worker/payload/inventory.py``, which needs
nothing but the standard library), so it sees what that interpreter imports.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

import envlock
from envlock import proc
from envlock.errors import CommandError


@dataclass(frozen=True)
class InventoryDiff:
    missing: dict[str, str]
    different: dict[str, tuple[str, str]]  # name -> (locked, installed)
    extra: dict[str, str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.different or self.extra)


def _inventory_script() -> Path:
    return Path(envlock.__file__).parent / "worker" / "payload" / "inventory.py"


def inventory(python: Path) -> dict[str, str]:
    """``{canonical name: version}`` of what ``python`` sees installed (run in that interpreter)."""
    done = proc.run([python, "-I", _inventory_script()], timeout=120,
                    what=f"could not list the packages of {python}")
    try:
        rows = json.loads(done.stdout)
        return {str(canonicalize_name(r["name"])): str(r["version"]) for r in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError([str(python), str(_inventory_script())], 0, done.stdout[-2000:],
                           what=f"unreadable package list from {python}") from exc


def _same_version(a: str, b: str) -> bool:
    try:
        return str(Version(a)) == str(Version(b))
    except InvalidVersion:
        return a == b


def compare_inventory(installed: Mapping[str, str], pins: Mapping[str, str], *,
                      ignore: Collection[str] = ()) -> InventoryDiff:
    skip = {str(canonicalize_name(n)) for n in ignore}
    want = {str(canonicalize_name(n)): v for n, v in pins.items() if canonicalize_name(n) not in skip}
    have = {n: v for n, v in installed.items() if n not in skip}
    return InventoryDiff(
        missing={n: v for n, v in want.items() if n not in have},
        different={n: (v, have[n]) for n, v in want.items() if n in have and not _same_version(v, have[n])},
        extra={n: v for n, v in have.items() if n not in want},
    )


def satisfies(python: Path, pins: Mapping[str, str], *, ignore: Collection[str] = ()) -> bool:
    """Whether ``python``'s environment holds exactly the locked ``name==version`` set.

    ``ignore`` names distributions left out of the comparison on both sides (say, envlock
    itself when the host environment is checked).
    """
    return compare_inventory(inventory(python), pins, ignore=ignore).ok


__all__ = ["InventoryDiff", "compare_inventory", "inventory", "satisfies"]
