"""Read .npy/.npz headers on the host, without loading data and without pickle."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from envlock._worker.arrays import check_shapes
from envlock._worker.model import WorkerFailure
from envlock.errors import InputArrayError

Shape = tuple[tuple[int, ...], np.dtype]


def _header(f: IO[bytes], where: str) -> Shape:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as exc:
        raise InputArrayError(f"{where}: not a .npy array ({exc})") from exc
    return tuple(int(d) for d in shape), dtype


def read_headers(path: Path) -> dict[str, Shape]:
    """name → (shape, dtype) of every array in a .npy (name "") or .npz file."""
    if not path.is_file():
        raise InputArrayError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as zf:
                out = {}
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as f:
                        out[info.filename[:-4]] = _header(f, f"{path}[{info.filename}]")
                return out
        except zipfile.BadZipFile as exc:
            raise InputArrayError(f"{path}: not a readable .npz file ({exc})") from exc
    with open(path, "rb") as f:
        return {"": _header(f, str(path))}


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
