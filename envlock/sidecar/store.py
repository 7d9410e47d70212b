"""The sidecar folder ``MODEL.envlock/``: written all-or-nothing, read back strictly.

Integrity: ``envlock.json`` lists the sha256 of every other file, and carries the sha256 of
its own canonical form. It is written in that canonical form (sorted keys, two-space indent),
so a reader can tell any byte changed in it: either the bytes are no longer canonical, or the
canonical content no longer matches its own hash. A file that is not listed is an error too
(a stray ``code/*.py`` would otherwise be imported). This detects modification; it does not
authenticate the writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envlock.errors import SidecarError
from envlock.facts.modelfile import file_sha256, sidecar_path
from envlock.sidecar.manifest import Manifest, load_schema, missing_sections, validate

MANIFEST = "envlock.json"
# The module, in code/, holding custom objects that were defined in the __main__ script.
MAIN_MODULE = "__envlock_main__"
SCHEMA_VERSION = 1
SCHEMA_NAME = "envlock.manifest"

# Upgrades from older schema versions: version → function returning the next version's dict.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _self_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class Sidecar:
    path: Path
    manifest: dict[str, Any]

    @property
    def manifest_sha256(self) -> str:
        return str(self.manifest["integrity"]["manifest_sha256"])

    def file(self, rel: str) -> Path:
        return self.path / rel

    @property
    def typed(self) -> Manifest:
        return Manifest.from_json(self.manifest)

    def require(self, *needs: str) -> None:
        """Refuse (exit 2) a sidecar without the sections a command needs (``probe``, ...), and
        one whose probe.npz holds anything but plain numeric arrays."""
        missing = missing_sections(self.manifest, needs)
        if missing:
            raise SidecarError(self.path, f"invalid manifest: {', '.join(missing)}: missing "
                               "(this command needs it)", file=MANIFEST,
                               hint="save the model again with `envlock save`")
        if "probe" in needs:
            from envlock.errors import InputArrayError
            from envlock.sidecar.arrays import read_headers

            try:
                headers = read_headers(self.file("probe.npz"))
            except InputArrayError as exc:
                raise SidecarError(self.path, f"unreadable probe ({exc})", file="probe.npz") from None
            bad = sorted(k for k, (_, dtype) in headers.items() if dtype.hasobject)
            if bad:
                raise SidecarError(self.path, f"array(s) {', '.join(bad)} hold Python objects (pickled "
                                   "data), which envlock never loads", file="probe.npz")
            if not any(k.startswith("input__") for k in headers):
                raise SidecarError(self.path, "holds no probe inputs", file="probe.npz")

    def get(self, *keys: str, default: Any = None) -> Any:
        node: Any = self.manifest
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                return default
            node = node[k]
        return node


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_sidecar(model: Path, manifest: dict[str, Any], files: Mapping[str, bytes | Path]) -> Sidecar:
    """Write ``files`` (relative path → bytes, or a file to copy) and the manifest.

    Built in a temporary folder beside the target, then renamed into place, so a crash or
    Ctrl-C leaves either the old sidecar or the new one, never a mix.
    """
    target = sidecar_path(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        hashes: dict[str, str] = {}
        for rel, content in sorted(files.items()):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            else:
                dest.write_bytes(content)
            hashes[rel] = file_sha256(dest)
        body = dict(manifest)
        body["schema"] = SCHEMA_NAME
        body["schema_version"] = SCHEMA_VERSION
        body["files"] = hashes
        body.pop("integrity", None)
        body["integrity"] = {"algorithm": "sha256", "manifest_sha256": _self_hash(body)}
        (tmp / MANIFEST).write_bytes(canonical_json(body))
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Sidecar(target, body)


def find_sidecar(model_or_sidecar: str | os.PathLike[str]) -> Path:
    p = Path(model_or_sidecar)
    if p.name.endswith(".envlock") and (p / MANIFEST).exists():
        return p
    return sidecar_path(p)


def read_sidecar(model_or_sidecar: str | os.PathLike[str], *, verify: bool = True) -> Sidecar:
    """Read and verify a sidecar. Any problem raises SidecarError naming the file (exit 2)."""
    root = find_sidecar(model_or_sidecar)
    if root.exists() and not root.is_dir():
        raise SidecarError(root, "not a sidecar folder (a file has its name)")
    if not root.is_dir():
        raise SidecarError(root, "no sidecar here", hint="run `envlock save MODEL` first")
    if not os.access(root, os.R_OK | os.X_OK):
        raise SidecarError(root, "cannot be read (permission denied)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise SidecarError(root, "missing", file=MANIFEST)
    try:
        raw = mpath.read_bytes()
    except OSError as exc:
        raise SidecarError(root, f"cannot be read ({exc.strerror or exc})", file=MANIFEST) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(root, f"corrupt or modified (not valid JSON: {exc})", file=MANIFEST) from exc
    except RecursionError:
        raise SidecarError(root, "corrupt or modified (JSON nested too deeply)", file=MANIFEST) from None
    if not isinstance(manifest, dict):
        raise SidecarError(root, "corrupt or modified (not a JSON object)", file=MANIFEST)
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SidecarError(root, "has no valid schema_version", file=MANIFEST)
    if version > SCHEMA_VERSION:
        raise SidecarError(root, f"schema version {version} is newer than this envlock understands "
                           f"(up to {SCHEMA_VERSION})", file=MANIFEST, hint="upgrade envlock")
    if version < 1:
        raise SidecarError(root, f"unknown schema version {version}", file=MANIFEST)
    if verify:
        _verify(root, manifest, raw)
    while manifest["schema_version"] < SCHEMA_VERSION:  # pragma: no cover - no old versions yet
        manifest = UPGRADES[manifest["schema_version"]](manifest)
    problems = validate(manifest, load_schema("manifest"))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SidecarError(root, f"invalid manifest: {problems[0]}{more}", file=MANIFEST,
                           hint="save the model again with `envlock save`")
    for text in ("requirements.lock.txt",):
        p = root / text
        if p.is_file():
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SidecarError(root, f"not UTF-8 text (byte {exc.start})", file=text) from None
    return Sidecar(root, manifest)


def _verify(root: Path, manifest: dict[str, Any], raw: bytes) -> None:
    integrity = manifest.get("integrity")
    if not isinstance(integrity, dict) or "manifest_sha256" not in integrity:
        raise SidecarError(root, "modified after it was written (no integrity record)", file=MANIFEST)
    if raw != canonical_json(manifest) or integrity["manifest_sha256"] != _self_hash(manifest):
        raise SidecarError(root, "modified after it was written (its sha256 does not match)",
                           file=MANIFEST, hint="save the model again, or restore the sidecar")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise SidecarError(root, "has no file list", file=MANIFEST)
    for rel, digest in sorted(listed.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not rel:
            raise SidecarError(root, f"lists a file outside the sidecar: {rel!r}", file=MANIFEST)
        p = root / rel
        if not p.is_file():
            raise SidecarError(root, "listed in the manifest but missing", file=rel)
        if file_sha256(p) != digest:
            raise SidecarError(root, "modified after it was written (its sha256 does not match "
                               "the manifest)", file=rel, hint="save the model again, or restore the file")
    for rel in _all_files(root):
        if rel != MANIFEST and rel not in listed and "__pycache__" not in rel:
            raise SidecarError(root, "not part of the sidecar as written (an added file)", file=rel)
