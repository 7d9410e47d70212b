"""Facts about a model file, read without importing TensorFlow.

Formats: a ``.keras`` archive (zip with metadata.json, config.json, model.weights.h5), a
legacy HDF5 file (``.h5``/``.hdf5``), or a SavedModel directory (``saved_model.pb``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from envlock.errors import ModelFileError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_VERSION_RE = re.compile(rb"(\d+\.\d+\.\d+(?:[a-z0-9.+-]*)?)")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: str  # "keras" | "h5" | "savedmodel"
    sha256: str
    size: int
    keras_version: str | None
    backend: str | None
    tensorflow_version: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.path.name,
            "format": self.format,
            "sha256": self.sha256,
            "size": self.size,
            "keras_version": self.keras_version,
            "backend": self.backend,
            "tensorflow_version": self.tensorflow_version,
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: Path) -> tuple[str, int]:
    """A digest of a directory: relative paths and file contents, in sorted order."""
    h = hashlib.sha256()
    size = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + file_sha256(p).encode() + b"\n")
            size += p.stat().st_size
    return h.hexdigest(), size


def _h5_attr(data: bytes, name: bytes) -> str | None:
    # HDF5 stores a short string attribute's value right after its name in the object header;
    # the first version-shaped string after the name is the value. Good enough to avoid h5py.
    i = data.find(name)
    if i < 0:
        return None
    m = _VERSION_RE.search(data, i + len(name), i + len(name) + 200)
    return m.group(1).decode() if m else None


def _h5_string_attr(data: bytes, name: bytes, choices: tuple[bytes, ...]) -> str | None:
    i = data.find(name)
    if i < 0:
        return None
    window = data[i + len(name): i + len(name) + 200]
    for c in choices:
        if c in window:
            return c.decode()
    return None


def inspect_model(path: str | Path) -> ModelInfo:
    """Validate and describe a model path; a bad one raises ModelFileError (exit 2)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file or directory")
    if p.is_dir():
        return _inspect_savedmodel(p)
    if p.stat().st_size == 0:
        raise ModelFileError(p, "empty file, not a model")
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return _inspect_keras(p)
    if head == HDF5_SIGNATURE:
        return _inspect_h5(p)
    raise ModelFileError(
        p, "not a model (expected a .keras archive, an HDF5 .h5 file or a SavedModel directory)"
    )


def _inspect_keras(p: Path) -> ModelInfo:
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelFileError(p, "a zip archive without config.json, not a Keras model")
            bad = zf.testzip()
            if bad is not None:
                raise ModelFileError(p, f"corrupt archive (member {bad} fails its CRC check)")
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
            json.loads(zf.read("config.json"))
    except zipfile.BadZipFile as exc:
        raise ModelFileError(p, f"corrupt archive ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(p, f"corrupt archive (unreadable JSON: {exc})") from exc
    except (OSError, EOFError) as exc:
        raise ModelFileError(p, f"corrupt archive ({exc})") from exc
    return ModelInfo(
        path=p, format="keras", sha256=file_sha256(p), size=p.stat().st_size,
        keras_version=meta.get("keras_version"), backend=meta.get("backend"),
        tensorflow_version=None,
    )


def _inspect_h5(p: Path) -> ModelInfo:
    data = p.read_bytes()
    if b"model_config" not in data and b"layer_names" not in data:
        raise ModelFileError(p, "an HDF5 file without a Keras model (no model_config, no layer_names)")
    return ModelInfo(
        path=p, format="h5", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        keras_version=_h5_attr(data, b"keras_version"),
        backend=_h5_string_attr(data, b"backend", (b"tensorflow", b"jax", b"torch", b"theano")),
        tensorflow_version=None,
    )


def _inspect_savedmodel(p: Path) -> ModelInfo:
    pb = p / "saved_model.pb"
    if not pb.is_file() and not (p / "saved_model.pbtxt").is_file():
        raise ModelFileError(p, "a directory without a SavedModel (no saved_model.pb)")
    data = pb.read_bytes() if pb.is_file() else b""
    # meta_info_def carries tensorflow_version as a plain protobuf string.
    tfv = _h5_attr(data, b"tensorflow_version") if data else None
    if tfv is None and data:
        m = re.search(rb"\x12.(\d+\.\d+\.\d+)", data)
        tfv = m.group(1).decode() if m else None
    keras_version = None
    meta = p / "keras_metadata.pb"
    if meta.is_file():
        keras_version = _h5_attr(meta.read_bytes(), b'"keras_version"')
    digest, size = tree_sha256(p)
    return ModelInfo(path=p, format="savedmodel", sha256=digest, size=size,
                     keras_version=keras_version, backend="tensorflow", tensorflow_version=tfv)


def sidecar_path(model: str | os.PathLike[str]) -> Path:
    """``model.keras`` → ``model.keras.envlock``; a SavedModel dir ``m/`` → ``m.envlock``."""
    p = Path(model)
    return p.with_name(p.name.rstrip("/") + ".envlock")
