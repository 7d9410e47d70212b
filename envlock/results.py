"""What the core returns: frozen dataclasses, rendered once for humans (cli) and once as JSON.

Each ``to_json()`` carries a ``schema`` key; tests pin the keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
