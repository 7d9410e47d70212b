"""The manifest's typed model, and the published JSON Schemas it (and every --json) follows.

``envlock/schemas/*.schema.json`` are the contract: ``manifest`` for ``envlock.json``, one per
command's ``--json`` output, and ``error`` for the failure document. The reader validates a
manifest against its schema before anything uses it, so a self-consistent but malformed
sidecar (a missing section, a string where an object belongs, ``probe: null``) is refused with
exit 2 naming the field, instead of a ``KeyError`` deep in a command.

The validator below implements the part of JSON Schema (2020-12) that the schemas use: type,
const, enum, required, properties, additionalProperties, items, minItems, minimum, minLength,
pattern and local ``$ref``. The test suite checks the same schemas with the ``jsonschema``
package, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list, tuple), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


@cache
def load_schema(name: str) -> dict[str, Any]:
    """``name`` is the file's stem: ``manifest``, ``run``, ``error``, ``cache.list``..."""
    return dict(json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")))


def schema_names() -> list[str]:
    return sorted(p.name[: -len(".schema.json")] for p in SCHEMA_DIR.glob("*.schema.json"))


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[kind])


def _kind(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is(value, name):
            return name
    return type(value).__name__


def _where(path: str) -> str:
    return path or "(the document)"


def validate(doc: Any, schema: Mapping[str, Any], *, root: Mapping[str, Any] | None = None,
             path: str = "") -> list[str]:
    """Every way ``doc`` breaks ``schema``, as ``field.path: problem`` lines (empty: valid)."""
    root = schema if root is None else root
    if "$ref" in schema:
        ref = str(schema["$ref"])
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref is supported, not {ref}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return validate(doc, target, root=root, path=path)
    errors: list[str] = []
    if "const" in schema and doc != schema["const"]:
        return [f"{_where(path)}: must be {json.dumps(schema['const'])}, not {json.dumps(doc)[:60]}"]
    if "enum" in schema and doc not in schema["enum"]:
        return [f"{_where(path)}: must be one of {', '.join(json.dumps(e) for e in schema['enum'])}, "
                f"not {json.dumps(doc)[:60]}"]
    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is(doc, k) for k in allowed):
            return [f"{_where(path)}: expected {' or '.join(allowed)}, found {_kind(doc)}"]
    if _is(doc, "number") and "minimum" in schema and doc < schema["minimum"]:
        errors.append(f"{_where(path)}: must be at least {schema['minimum']}, not {doc}")
    if isinstance(doc, str):
        if len(doc) < schema.get("minLength", 0):
            errors.append(f"{_where(path)}: must not be empty")
        if "pattern" in schema and not re.search(schema["pattern"], doc):
            errors.append(f"{_where(path)}: {json.dumps(doc)[:60]} is not in the expected form")
    if isinstance(doc, (list, tuple)):
        if len(doc) < schema.get("minItems", 0):
            errors.append(f"{_where(path)}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(doc):
                errors += validate(item, schema["items"], root=root, path=f"{path}[{i}]")
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                errors.append(f"{path + '.' if path else ''}{key}: missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in props:
                errors += validate(value, props[key], root=root, path=sub)
            elif extra is False:
                errors.append(f"{sub}: not a known field")
            elif isinstance(extra, Mapping):
                errors += validate(value, extra, root=root, path=sub)
    return errors


# -- the typed view of what the commands read ------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ArraySpec:
        return cls(str(doc["name"]), tuple(doc["shape"]), str(doc["dtype"]))


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass(frozen=True)
class Probe:
    file: str
    inputs: tuple[ArraySpec, ...]
    outputs: tuple[ArraySpec, ...]
    batch_size: int
    tolerance: Tolerance
    repeat_bitwise_equal: bool
    source: str


@dataclass(frozen=True)
class ModelSection:
    file: str
    format: str
    sha256: str | None
    inputs: tuple[ArraySpec, ...]
    outputs: tuple[ArraySpec, ...]


@dataclass(frozen=True)
class Manifest:
    """The typed manifest. Built only from a document that passed :func:`validate`."""

    schema_version: int
    envlock_version: str
    created: str
    command: str
    model: ModelSection
    python_version: str
    probe: Probe | None
    files: Mapping[str, str]

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        m = doc["model"]
        p = doc.get("probe")
        probe = None if p is None else Probe(
            file=p["file"], inputs=_specs(p["inputs"]), outputs=_specs(p["outputs"]),
            batch_size=int(p["batch_size"]),
            tolerance=Tolerance(float(p["tolerance"]["atol"]), float(p["tolerance"]["rtol"])),
            repeat_bitwise_equal=bool(p["repeat_bitwise_equal"]), source=str(p["source"]))
        return cls(
            schema_version=int(doc["schema_version"]), envlock_version=str(doc["envlock_version"]),
            created=str(doc["created"]), command=str(doc["command"]),
            model=ModelSection(file=m["file"], format=m["format"], sha256=m.get("sha256"),
                               inputs=_specs(m.get("inputs") or ()), outputs=_specs(m.get("outputs") or ())),
            python_version=str(doc["python"]["version"]), probe=probe, files=dict(doc["files"]),
        )


def _specs(items: Sequence[Mapping[str, Any]]) -> tuple[ArraySpec, ...]:
    return tuple(ArraySpec.from_json(i) for i in items)


# What a command that runs the model needs beyond what every sidecar has.
RUN_NEEDS = ("probe", "weights", "model.inputs")


def missing_sections(doc: Mapping[str, Any], needs: Sequence[str]) -> list[str]:
    out = []
    for dotted in needs:
        node: Any = doc
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            out.append(dotted)
    return out
