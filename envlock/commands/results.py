"""What the core returns: frozen dataclasses, rendered once for humans (cli) and once as JSON.

Each ``to_json()`` carries a ``schema`` key; tests pin the keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


@dataclass(frozen=True)
class SaveResult:
    model: Path
    sidecar: Path
    packages: int
    hashed: int
    missing_hashes: tuple[str, ...]
    risks: tuple[dict[str, Any], ...]
    custom_objects: tuple[dict[str, Any], ...]
    weights_overall: str
    weights_restored: bool
    mismatched_layers: tuple[str, ...]
    probe_inputs: tuple[dict[str, Any], ...]
    probe_repeatable: bool
    warnings: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)

    schema = "envlock.save/1"

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, **_jsonable(asdict(self))}


@dataclass(frozen=True)
class ShowResult:
    sidecar: Path
    manifest: dict[str, Any]

    schema = "envlock.show/1"

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "sidecar": str(self.sidecar), "manifest": self.manifest}


@dataclass(frozen=True)
class EnvResult:
    """``envlock env``: the environment that was built or found, and the modules imported in it."""

    strategy: str
    python: Path
    env_path: Path | None
    built: bool
    custom_objects: tuple[str, ...] = ()

    schema = "envlock.env/1"

    @property
    def prefix(self) -> Path:
        """The environment's folder (for ``current``: the prefix of this interpreter)."""
        return self.env_path or self.python.parent.parent

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "strategy": self.strategy,
                "path": str(self.env_path) if self.env_path else None, "python": str(self.python),
                "built": self.built, "custom_objects": list(self.custom_objects)}


@dataclass(frozen=True)
class CachedEnv:
    """One complete environment of the cache, as ``envlock cache list`` shows it."""

    key: str
    path: Path
    python: str
    installer: str
    created: datetime
    last_used: datetime
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "python": self.python, "installer": self.installer,
                "created": self.created.isoformat(), "last_used": self.last_used.isoformat(),
                "size": self.size}


@dataclass(frozen=True)
class CacheListResult:
    environments: tuple[CachedEnv, ...]

    schema = "envlock.cache.list/1"

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "environments": [e.to_json() for e in self.environments]}


@dataclass(frozen=True)
class RemovedEnv:
    """One folder ``envlock cache gc`` removed; ``reason`` is ``partial``, ``age`` or ``size``."""

    key: str
    path: Path
    reason: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "reason": self.reason, "size": self.size}


@dataclass(frozen=True)
class CacheGcResult:
    removed: tuple[RemovedEnv, ...]

    schema = "envlock.cache.gc/1"

    @property
    def freed(self) -> int:
        """Bytes of the removed folders (hardlinks into uv's cache counted: an upper bound)."""
        return sum(r.size for r in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "removed": [r.to_json() for r in self.removed]}
