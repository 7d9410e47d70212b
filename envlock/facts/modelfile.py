"""Facts about a model file, read without importing TensorFlow.

Formats: a ``.keras`` archive (zip with metadata.json, config.json, model.weights.h5), a
legacy HDF5 file (``.h5``/``.hdf5``), or a SavedModel directory (``saved_model.pb``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from envlock.errors import ModelFileError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A zip member is read with a limit, never whole on trust: a 1 MB archive can inflate to GBs.
MAX_JSON_MEMBER = 64 << 20  # config.json of the largest Keras models is a few MB
MAX_INFLATION = 200  # uncompressed/compressed beyond this, and past MIN_BOMB, is refused
MIN_BOMB = 1 << 30
_CHUNK = 1 << 20
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


def _stat_problem(p: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"a symbolic link to {os.readlink(p)}, which does not exist"
    return f"cannot be read ({exc.strerror or exc})"


def check_model_path(path: str | Path) -> Path:
    """The checks of a model path that read nothing of it: it exists (not a dangling link or a
    loop) and can be looked at. A bad one raises ModelFileError (exit 2)."""
    p = Path(path)
    if not str(path):
        raise ModelFileError("''", "an empty path is not a model")
    try:
        p.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not p.is_symlink():
            raise ModelFileError(p, "no such file or directory") from None
        raise ModelFileError(p, _stat_problem(p, exc)) from None
    return p


def inspect_model(path: str | Path) -> ModelInfo:
    """Validate and describe a model path; a bad one raises ModelFileError (exit 2)."""
    p = check_model_path(path)
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise ModelFileError(p, "a folder that cannot be read (permission denied)")
        return _inspect_savedmodel(p)
    if not p.is_file():
        raise ModelFileError(p, "not a regular file, not a model")
    if p.stat().st_size == 0:
        raise ModelFileError(p, "empty file, not a model")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelFileError(p, f"cannot be read ({exc.strerror or exc})") from None
    if head.startswith(b"PK"):
        return _inspect_keras(p)
    if head == HDF5_SIGNATURE:
        return _inspect_h5(p)
    raise ModelFileError(
        p, "not a model (expected a .keras archive, an HDF5 .h5 file or a SavedModel directory)"
    )


def _read_json_member(p: Path, zf: zipfile.ZipFile, name: str) -> dict[str, object]:
    info = zf.getinfo(name)
    if info.file_size > MAX_JSON_MEMBER:
        raise ModelFileError(p, f"{name} inflates to {info.file_size} bytes (more than "
                             f"{MAX_JSON_MEMBER >> 20} MiB): refused as a possible zip bomb")
    with zf.open(info) as f:
        data = f.read(MAX_JSON_MEMBER + 1)
    if len(data) > MAX_JSON_MEMBER:
        raise ModelFileError(p, f"{name} inflates past {MAX_JSON_MEMBER >> 20} MiB: refused as a "
                             "possible zip bomb")
    try:
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ModelFileError(p, f"{name} is nested too deeply to be a Keras model's JSON") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(p, f"corrupt archive ({name} is not JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(p, f"corrupt archive ({name} holds a JSON {type(doc).__name__}, "
                             "not an object)")
    return doc


def check_archive_directory(path: Path) -> None:
    """The checks of a .keras archive that read only its central directory (encrypted members,
    zip bombs by their declared sizes): milliseconds, so save runs them before it starts
    anything, and leaves the full read (CRCs, sha256) for later."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                return
        with zipfile.ZipFile(path) as zf:
            _check_directory(path, zf)
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # inspect_model says what is wrong with it, in its own words


def _check_directory(p: Path, zf: zipfile.ZipFile) -> None:
    infos = zf.infolist()
    for info in infos:
        if info.flag_bits & 0x1:
            raise ModelFileError(p, f"member {info.filename} is encrypted; a Keras archive never is")
        if info.filename.endswith(".json") and info.file_size > MAX_JSON_MEMBER:
            raise ModelFileError(p, f"{info.filename} inflates to {info.file_size} bytes (more than "
                                 f"{MAX_JSON_MEMBER >> 20} MiB): refused as a possible zip bomb")
    declared = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos) or 1
    if declared > MIN_BOMB and declared > MAX_INFLATION * packed:
        raise ModelFileError(p, f"inflates to {declared} bytes from {packed} ({declared // packed}:1): "
                             "refused as a possible zip bomb")


def _check_members(p: Path, zf: zipfile.ZipFile) -> None:
    """Every member's CRC, read in chunks; encrypted members and bombs refused before reading."""
    _check_directory(p, zf)
    for info in zf.infolist():
        with zf.open(info) as f:
            while f.read(_CHUNK):
                pass


def _inspect_keras(p: Path) -> ModelInfo:
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelFileError(p, "a zip archive without config.json, not a Keras model")
            _check_members(p, zf)
            meta = _read_json_member(p, zf, "metadata.json") if "metadata.json" in names else {}
            _read_json_member(p, zf, "config.json")
    except zipfile.BadZipFile as exc:
        raise ModelFileError(p, f"corrupt archive ({exc})") from exc
    except NotImplementedError as exc:  # a compression method zipfile does not implement
        raise ModelFileError(p, f"unsupported archive ({exc})") from exc
    except RuntimeError as exc:  # zipfile: "File ... is encrypted, password required"
        raise ModelFileError(p, f"unreadable archive ({exc})") from exc
    except (zlib.error, EOFError, ValueError) as exc:
        raise ModelFileError(p, f"corrupt archive ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise ModelFileError(p, f"corrupt archive ({exc})") from exc
    keras_version, backend = meta.get("keras_version"), meta.get("backend")
    return ModelInfo(
        path=p, format="keras", sha256=file_sha256(p), size=p.stat().st_size,
        keras_version=keras_version if isinstance(keras_version, str) else None,
        backend=backend if isinstance(backend, str) else None, tensorflow_version=None,
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
    if p.name in ("", ".", ".."):  # "." or "..": the folder's own name; "/": none at all
        p = p.absolute().resolve()
    if not p.name:
        raise ModelFileError(p, "the root folder is not a model")
    return p.with_name(p.name + ".envlock")
