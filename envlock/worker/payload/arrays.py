"""Inputs and outputs: probe generation, validation, chunked prediction into files.

Large arrays never travel through the pipe: inputs are memory-mapped from the user's
file, outputs are written to a temporary file that the host renames into place.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .loading import WorkerFailure
from .model import as_array, output_names

PROBE_ROWS = 16
CHUNK_BYTES = 64 * 1024 * 1024


def probe_inputs(specs, seed: int = 0, rows: int = PROBE_ROWS):
    """Seeded probe inputs from the model's input specs (every input of a multi-input model)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        dims = [rows] + [8 if d is None else d for d in spec["shape"][1:]]
        dtype = np.dtype(spec["dtype"]) if spec["dtype"] not in ("string", "str") else None
        if dtype is None:
            # A few different words, so that a lookup or vectorization layer sees more than one.
            words = np.array(["the", "probe", "of", "envlock", "a", "model", "text", "input"])
            picks = rng.integers(0, len(words), size=(int(np.prod(dims)), 3))
            arrays[spec["name"]] = np.array([" ".join(words[p]) for p in picks]).reshape(dims)
        elif dtype.kind == "f":
            arrays[spec["name"]] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            # Small non-negative integers stay valid for embeddings and lookups of any size.
            arrays[spec["name"]] = rng.integers(0, 2, size=dims).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec["name"]] = rng.integers(0, 2, size=dims).astype(bool)
        else:
            arrays[spec["name"]] = np.zeros(dims, dtype=dtype)
    return arrays


def _load_npy(path: str):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise WorkerFailure("%s: %s" % (path, exc), kind="input") from None


def read_inputs(path: str, specs):
    """Arrays in the order of the model's inputs: .npy for one input, .npz keyed by input name."""
    names = [s["name"] for s in specs]
    if path.endswith(".npz"):
        try:
            npz = np.load(path, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise WorkerFailure("%s: not a readable .npz file (%s)" % (path, exc),
                                kind="input") from None
        keys = list(npz.files)
        if len(names) == 1 and len(keys) == 1:
            return [npz[keys[0]]]
        missing = [n for n in names if n not in keys]
        if missing:
            raise WorkerFailure("%s has no array for input(s) %s (it has %s)" % (
                path, ", ".join(missing), ", ".join(keys) or "none"), kind="input")
        return [npz[n] for n in names]
    if len(names) != 1:
        raise WorkerFailure("the model has %d inputs (%s): pass an .npz with one array per input"
                            % (len(names), ", ".join(names)), kind="input")
    return [_load_npy(path)]


def check_inputs(arrays, specs) -> None:
    check_shapes([(tuple(a.shape), a.dtype) for a in arrays], specs)


def check_shapes(shapes, specs) -> None:
    """Refuse inputs that do not fit the model. ``shapes``: [(shape, dtype)] in input order.

    Shared with the host, which checks .npy headers before it starts a worker.
    """
    n = None
    for (shape, dtype), spec in zip(shapes, specs):
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise WorkerFailure("input %s holds Python objects (a pickled array); only numeric "
                                "arrays are accepted" % spec["name"], kind="input")
        want = spec["shape"]
        if len(shape) != len(want) or any(
                w is not None and w != g for w, g in zip(want[1:], shape[1:])):
            raise WorkerFailure("input %s has shape %s; the model expects (%s)" % (
                spec["name"], tuple(shape), ", ".join("None" if d is None else str(d) for d in want)),
                kind="input")
        target = np.dtype(spec["dtype"]) if spec["dtype"] not in ("string", "str") else None
        if target is None and dtype.kind not in "SU":
            raise WorkerFailure("input %s has dtype %s; the model takes strings (an array of dtype "
                                "str or bytes)" % (spec["name"], dtype), kind="input")
        if target is not None and not np.can_cast(dtype, target, casting="same_kind"):
            raise WorkerFailure("input %s has dtype %s, which cannot be cast safely to %s" % (
                spec["name"], dtype, target), kind="input")
        if len(shape) == 0 or shape[0] == 0:
            raise WorkerFailure("input %s has no rows" % spec["name"], kind="input")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise WorkerFailure("inputs have different numbers of rows (%d and %d)"
                                % (n, shape[0]), kind="input")


def _normalise_outputs(model, result) -> list:
    if isinstance(result, dict):
        return [(str(k), as_array(v)) for k, v in sorted(result.items())]
    if isinstance(result, (list, tuple)):
        names = output_names(model, len(result))
        return [(n, as_array(v)) for n, v in zip(names, result)]
    return [(output_names(model, 1)[0], as_array(result))]


def _feedable(model, batch):
    """Keras 3 refuses numpy str/bytes arrays ("Invalid dtype: str..."): strings go in as
    string tensors. Keras 2 and numeric arrays take numpy as it is."""
    if not any(b.dtype.kind in "SU" for b in batch) or _keras_major() < 3:
        return batch
    from .framework import import_tf
    tf = import_tf()
    return [tf.constant(b) if b.dtype.kind in "SU" else b for b in batch]


def _keras_major() -> int:
    from .framework import import_keras
    return int(str(getattr(import_keras(), "__version__", "3")).split(".")[0] or 3)


def predict_to_files(model, arrays, batch_size: int, out_dir: str, progress=None) -> list:
    """Predict in chunks of whole batches and write each output to ``out_dir/<i>.npy``.

    Chunks are a multiple of ``batch_size``, so every batch the model sees is the batch that
    one ``model.predict(x, batch_size)`` call would have given it: the same bits.
    """
    n = int(arrays[0].shape[0])
    row_bytes = max(1, sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays))
    chunk = max(batch_size, (CHUNK_BYTES // row_bytes) // batch_size * batch_size)
    outs = None
    meta = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        batch = _feedable(model, [np.asarray(a[start:stop]) for a in arrays])
        if hasattr(model, "predict"):
            x = batch[0] if len(batch) == 1 else batch
            result = model.predict(x, batch_size=batch_size, verbose=0)
        else:  # TFSMLayer: call it batch by batch, as predict would
            parts = []
            for b0 in range(0, stop - start, batch_size):
                xb = [b[b0:b0 + batch_size] for b in batch]
                parts.append(model(*xb) if len(xb) > 1 else model(xb[0]))
            if parts and isinstance(parts[0], dict):
                result = {k: np.concatenate([as_array(p[k]) for p in parts]) for k in parts[0]}
            else:
                result = np.concatenate([as_array(p) for p in parts])
        named = _normalise_outputs(model, result)
        if outs is None:
            outs = []
            for i, (name, arr) in enumerate(named):
                p = os.path.join(out_dir, "%d.npy" % i)
                mm = np.lib.format.open_memmap(p, mode="w+", dtype=arr.dtype, shape=(n, *arr.shape[1:]))
                outs.append(mm)
                meta.append({"name": name, "file": p, "shape": [n, *list(arr.shape[1:])],
                             "dtype": str(arr.dtype)})
        for mm, (_, arr) in zip(outs, named):
            mm[start:stop] = arr
        if progress is not None:
            progress(stop, n)
    for mm in outs or []:
        mm.flush()
    del outs
    return meta
