"""The weight arrays a model file stores (without loading the model), hashed per variable."""

from __future__ import annotations

import os
import zipfile

from .fingerprint import array_sha256
from .framework import import_tf
from .loading import model_format

# Groups of a saved file that hold no state of what the model computes: an optimizer's (of the
# model, or of an inner model trained on its own before) and compiled metrics' counters.
_NOT_MODEL_STATE = ("optimizer", "optimizer_weights", "metrics", "compile_metrics")


def _keras_arrays(f, out):
    """A .keras file's model.weights.h5: <path of one layer>/vars/<i>, i in the layer's order."""
    import h5py

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        if any(p in _NOT_MODEL_STATE for p in parts[:-1]):
            return
        if len(parts) >= 2 and parts[-2] == "vars" and parts[-1].isdigit():
            group, index = "/".join(parts[:-2]), int(parts[-1])
        else:
            group, index = "/".join(parts[:-1]), None
        layer = group.split("/")[-1] if group else name
        out.append({"layer": layer, "group": group, "index": index, "key": name,
                    "sha256": array_sha256(obj[()])})
    f.visititems(visit)


def _h5_arrays(f, out):
    """A legacy .h5 file: model_weights/<layer>/<weight name>, ordered by the layer's
    ``weight_names`` (the order in which Keras assigns them back)."""
    import h5py
    root = f.get("model_weights", f)
    for layer_name in root:
        if layer_name in _NOT_MODEL_STATE:
            continue
        g = root[layer_name]
        if not isinstance(g, h5py.Group):
            continue
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs.get("weight_names", [])]
        if not names:
            continue
        per_group: dict = {}
        for n in names:
            ds = g.get(n)
            if ds is None:
                continue
            # The folder of the weight's name is its own layer (nested models keep one h5 group
            # for all their layers' weights): "dense_5/kernel:0".
            group = "%s/%s" % (layer_name, n.rsplit("/", 1)[0]) if "/" in n else layer_name
            index = per_group.get(group, 0)
            per_group[group] = index + 1
            out.append({"layer": group.split("/")[-1], "group": group, "index": index,
                        "key": "%s/%s" % (layer_name, n), "sha256": array_sha256(ds[()])})


class _StoredMember:
    """A read-only file object over an uncompressed zip member, in place in the archive."""

    def __init__(self, path, info):
        import struct
        self._fh = open(path, "rb")  # noqa: SIM115  (closed by close(), as a file object is)
        self._fh.seek(info.header_offset)
        header = self._fh.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        self._start = info.header_offset + 30 + name_len + extra_len
        self._size = info.file_size
        self._pos = 0

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(view[:n]) if n else 0
        self._pos += got
        return got

    def read(self, n=-1):
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        buf = bytearray(max(0, n))
        return bytes(buf[:self.readinto(buf)])

    def close(self):
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stored_weights(path: str) -> list:
    """Every weight array stored in the model file: {"layer", "group", "index", "key", "sha256"}
    (see fingerprint.compare_with_stored). Optimizer state and metrics are left out."""
    fmt = model_format(path)
    out: list = []
    if fmt == "keras":
        import io

        import h5py
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "model.weights.h5" not in names:
                return out
            info = zf.getinfo("model.weights.h5")
            # Keras stores the member uncompressed: read it in place, not as a second copy of
            # every weight in memory (a big model would need twice its size here).
            data = _StoredMember(path, info) if info.compress_type == zipfile.ZIP_STORED \
                else io.BytesIO(zf.read("model.weights.h5"))
        with data, h5py.File(data, "r") as f:
            _keras_arrays(f, out)
    elif fmt == "h5":
        import h5py
        with h5py.File(path, "r") as f:
            _h5_arrays(f, out)
    else:
        tf = import_tf()
        prefix = os.path.join(path, "variables", "variables")
        reader = tf.train.load_checkpoint(prefix)
        for key in sorted(reader.get_variable_to_shape_map()):
            # Neither optimizers' state (the model's, an inner model's: .../optimizer/..., slot
            # variables: .OPTIMIZER_SLOT) nor compiled metrics' counters (keras_api/metrics/...)
            # are part of what the model computes. Keras 3's model.export() saves every variable
            # twice, under variables/ and _all_variables/ (separate objects, same values).
            parts = key.split("/")
            if not key.endswith(".ATTRIBUTES/VARIABLE_VALUE") or ".OPTIMIZER_SLOT" in parts \
                    or any(p in _NOT_MODEL_STATE for p in parts[:-2]) \
                    or parts[0] == "_all_variables":
                continue
            layer = parts[-3] if len(parts) >= 3 else key
            # A checkpoint's keys follow the object graph, not the layers' order: no index.
            out.append({"layer": layer, "group": "/".join(parts[:-3]), "index": None, "key": key,
                        "sha256": array_sha256(reader.get_tensor(key))})
    return out
