"""What the core returns: frozen dataclasses, rendered once for humans (cli) and once as JSON.

Each ``to_json()`` carries a ``schema`` key; tests pin the keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from envlock.diagnosis.compare import IDENTICAL, WITHIN_TOLERANCE, OutputComparison
from envlock.diagnosis.findings import Finding

CHECK_SCHEMA = "envlock.check/1"
EXPORT_SCHEMA = "envlock.export/1"


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


@dataclass(frozen=True)
class CheckResult:
    model: Path
    status: str
    outputs: tuple[OutputComparison, ...]
    findings: tuple[Finding, ...]
    notes: tuple[dict[str, Any], ...]
    strategy: str | None
    python: str | None
    tolerance: dict[str, float]
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    schema = CHECK_SCHEMA

    @property
    def ok(self) -> bool:
        return self.status in (IDENTICAL, WITHIN_TOLERANCE)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": str(self.model),
            "status": self.status,
            "tolerance": self.tolerance,
            "outputs": [o.to_json() for o in self.outputs],
            "findings": [f.to_json() for f in self.findings],
            "notes": list(self.notes),
            "strategy": self.strategy,
            "python": self.python,
            "error": self.error,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class PackageChange:
    name: str
    recorded: str | None
    current: str | None
    matters: bool

    @property
    def kind(self) -> str:
        return "added" if self.recorded is None else "removed" if self.current is None else "changed"


@dataclass(frozen=True)
class DiffResult:
    model: Path
    python: str
    packages: tuple[PackageChange, ...]
    findings: tuple[Finding, ...]
    framework_error: str | None

    schema = "envlock.diff/1"

    @property
    def differences(self) -> int:
        return len(self.packages) + len(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "model": str(self.model), "python": self.python,
            "differences": self.differences,
            "packages": [{"name": p.name, "kind": p.kind, "recorded": p.recorded, "current": p.current,
                          "matters": p.matters} for p in self.packages],
            "findings": [f.to_json() for f in self.findings],
            "framework_error": self.framework_error,
        }


@dataclass(frozen=True)
class ExportResult:
    model: Path
    format: str
    text: str
    output: Path | None  # None: the caller prints ``text``

    schema = EXPORT_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "model": str(self.model), "format": self.format,
                "output": str(self.output) if self.output else None, "text": self.text}


@dataclass(frozen=True)
class Validation:
    status: str
    outputs: tuple[OutputComparison, ...]
    seconds: float
    # Outputs the model samples at inference: compared and reported, but not part of ``status``.
    sampled: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "outputs": [o.to_json() for o in self.outputs],
                "seconds": self.seconds, "sampled_outputs": list(self.sampled)}


@dataclass(frozen=True)
class RunResult:
    model: Path
    output: Path
    rows: int
    outputs: tuple[dict[str, Any], ...]
    strategy: str
    python: Path
    env_path: Path | None
    built: bool
    validation: Validation | None
    seconds: dict[str, float] = field(default_factory=dict)
    sampled_outputs: tuple[str, ...] = ()
    note: str | None = None
    nonfinite_rows: int = 0  # input rows holding a NaN or an infinity: predicted, and reported

    schema = "envlock.run/1"

    @property
    def reproducible(self) -> bool:
        """Whether every output is promised bit for bit (not for a model that samples)."""
        return not self.sampled_outputs

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "model": str(self.model), "output": str(self.output),
            "rows": self.rows, "outputs": list(self.outputs), "strategy": self.strategy,
            "python": str(self.python), "env_path": str(self.env_path) if self.env_path else None,
            "built": self.built, "validation": self.validation.to_json() if self.validation else None,
            "seconds": self.seconds, "reproducible": self.reproducible,
            "sampled_outputs": list(self.sampled_outputs), "note": self.note,
            "nonfinite_rows": self.nonfinite_rows,
        }


@dataclass(frozen=True)
class ShardResult:
    input: Path
    output: Path
    provenance: Path
    rows: int
    seconds: float
    node: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"input": str(self.input), "output": str(self.output), "provenance": str(self.provenance),
                "rows": self.rows, "seconds": self.seconds, "node_id": self.node.get("node_id"),
                "hostname": self.node.get("hostname")}


@dataclass(frozen=True)
class ShardRunResult:
    model: Path
    input: str
    output_dir: Path
    rows: int
    shards: tuple[ShardResult, ...]
    nodes: tuple[dict[str, Any], ...]  # one per worker (actor): where it ran, what it proved
    lock_sha256: str
    ray_address: str | None
    seconds: float

    schema = "envlock.run.shards/1"

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "model": str(self.model), "input": self.input,
                "output_dir": str(self.output_dir), "rows": self.rows, "lock_sha256": self.lock_sha256,
                "ray": {"address": self.ray_address} if self.ray_address is not None else None,
                "shards": [s.to_json() for s in self.shards], "nodes": list(self.nodes),
                "seconds": self.seconds}
