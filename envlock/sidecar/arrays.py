"""Read .npy/.npz headers on the host, without loading data and without pickle."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from envlock.errors import BadInputError, InputArrayError
from envlock.fs import check_readable
from envlock.worker.payload.arrays import check_shapes
from envlock.worker.payload.model import WorkerFailure

Shape = tuple[tuple[int, ...], np.dtype]
_CHUNK = 16 << 20


def _header(f: IO[bytes], where: str) -> tuple[Shape, bool]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise InputArrayError(f"{where}: not a .npy array ({exc})") from exc
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InputArrayError(f"{where}: the header declares a negative dimension {shape}")
    return (shape, dtype), bool(fortran)


def _check_size(where: str, shape: tuple[int, ...], dtype: np.dtype, have: int) -> None:
    """The data the header declares is all there: a truncated file, or a header claiming
    10^12 rows, is refused here, before any worker starts."""
    if dtype.hasobject:
        return  # no fixed size; check_shapes refuses object arrays with a message of its own
    need = math.prod(shape) * dtype.itemsize
    if need > have:
        rows = f"{shape[0]} rows of " if shape else ""
        raise InputArrayError(f"{where}: truncated or corrupt: its header declares {rows}shape {shape} "
                              f"{dtype} ({need} bytes of data), but it holds {max(have, 0)}")


def _zip_problem(path: Path, exc: BaseException) -> InputArrayError:
    return InputArrayError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})")


def read_headers(path: Path, *, what: str = "input") -> dict[str, Shape]:
    """name → (shape, dtype) of every array in a .npy (name "") or .npz file.

    Reads headers only (never the data, never a pickle), and checks that each file holds
    as many bytes as its header declares. Errors name ``path`` as the caller gave it.
    """
    try:
        check_readable(path, what)
    except BadInputError as exc:
        raise InputArrayError(str(exc)) from None
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as zf:
                out = {}
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    where = f"{path}[{info.filename}]"
                    if info.flag_bits & 0x1:
                        raise InputArrayError(f"{where}: an encrypted member; envlock cannot read it")
                    with zf.open(info) as f:
                        (shape, dtype), _ = _header(f, where)
                        _check_size(where, shape, dtype, info.file_size - f.tell())
                    out[info.filename[:-4]] = (shape, dtype)
                if not out:
                    raise InputArrayError(f"{path}: an .npz file without any array")
                return out
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
                zlib.error, EOFError, ValueError, OSError) as exc:
            raise _zip_problem(path, exc) from exc
    with open(path, "rb") as f:
        (shape, dtype), _ = _header(f, str(path))
        _check_size(str(path), shape, dtype, os.fstat(f.fileno()).st_size - f.tell())
    return {"": (shape, dtype)}


def _nonfinite_in(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Per row: does it hold a NaN or an infinity? Streams C-order data in chunks of rows."""
    rows = shape[0] if shape else 1
    per_row = (math.prod(shape[1:]) if len(shape) > 1 else 1) * dtype.itemsize
    bad = np.zeros(rows, dtype=bool)
    step = max(1, _CHUNK // max(per_row, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = np.frombuffer(f.read(n * per_row), dtype=dtype, count=n * per_row // dtype.itemsize)
        bad[start:start + n] = ~np.isfinite(block.reshape(n, -1)).all(axis=1)
    return bad


def nonfinite_rows(path: Path) -> int:
    """How many rows hold a NaN or an infinity in any input array (the worker predicts them,
    the user is told). Integer and boolean arrays cannot, and are not read."""
    bad: np.ndarray | None = None

    def merge(rows: np.ndarray) -> None:
        nonlocal bad
        bad = rows if bad is None or len(bad) != len(rows) else bad | rows

    def scan(f: IO[bytes], where: str) -> None:
        (shape, dtype), fortran = _header(f, where)
        if dtype.kind not in "fc" or not shape:
            return
        if fortran:  # rows are not contiguous: read it whole (rare: numpy writes C order)
            data = np.frombuffer(f.read(), dtype=dtype).reshape(shape, order="F")
            merge(~np.isfinite(data.reshape(shape[0], -1)).all(axis=1))
        else:
            merge(_nonfinite_in(f, shape, dtype))

    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        scan(f, f"{path}[{info.filename}]")
    else:
        with open(path, "rb") as f:
            scan(f, str(path))
    return int(bad.sum()) if bad is not None else 0


def save_npz(target: str | os.PathLike[str] | IO[bytes], arrays: Mapping[str, Any]) -> None:
    """np.savez with keys taken from a mapping (never pickled: numeric arrays only)."""
    np.savez(target, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]


def check_input_file(path: Path, specs: Sequence[Mapping[str, Any]]) -> int:
    """Refuse a file that does not fit the model's inputs (exit 2). Returns the row count."""
    headers = read_headers(path)
    names = [s["name"] for s in specs]
    if path.suffix == ".npz":
        if len(names) == 1 and len(headers) == 1:
            ordered = list(headers.values())
        else:
            missing = [n for n in names if n not in headers]
            if missing:
                raise InputArrayError(f"{path} has no array for input(s) {', '.join(missing)} "
                                      f"(it has {', '.join(headers) or 'none'})")
            ordered = [headers[n] for n in names]
    else:
        if len(names) != 1:
            raise InputArrayError(f"the model has {len(names)} inputs ({', '.join(names)}): "
                                  "pass an .npz with one array per input")
        ordered = [headers[""]]
    try:
        check_shapes(ordered, specs)
    except WorkerFailure as exc:
        raise InputArrayError(f"{path}: {exc}") from None
    return int(ordered[0][0][0])
