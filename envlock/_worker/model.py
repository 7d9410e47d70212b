"""Load a model and describe it: input/output specs, custom objects, stored weights."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import sys
import sysconfig
import zipfile

import numpy as np

from .fingerprint import array_sha256, walk_layers
from .framework import import_keras, import_tf

BUILTIN_PREFIXES = ("keras", "tensorflow", "tf_keras", "builtins", "numpy", "keras_nlp",
                    "keras_cv", "keras_hub", "tensorflow_hub")


class WorkerFailure(Exception):
    """A failure the host shows as one line; ``cause`` is a DESIGN section 4 code."""

    def __init__(self, message: str, cause=None, kind="load"):  # type: ignore[no-untyped-def]
        Exception.__init__(self, message)
        self.cause = cause
        self.kind = kind


def is_builtin(module: str) -> bool:
    return not module or module.split(".")[0] in BUILTIN_PREFIXES


def model_format(path: str) -> str:
    if os.path.isdir(path):
        return "savedmodel"
    if path.endswith((".h5", ".hdf5")):
        return "h5"
    return "keras"


class _SavedModelWrapper:
    """A SavedModel directory loaded under Keras 3, which no longer loads it as a Model."""


def load_model(path: str, safe_mode: bool = True, custom_objects=None):  # type: ignore[no-untyped-def]
    keras = import_keras()
    fmt = model_format(path)
    kwargs = {"compile": False}
    if custom_objects:
        kwargs["custom_objects"] = custom_objects
    major = int(str(getattr(keras, "__version__", "3")).split(".")[0] or 3)
    try:
        if fmt == "savedmodel" and major >= 3:
            layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
            return layer
        if "safe_mode" in inspect.signature(keras.models.load_model).parameters and fmt == "keras":
            kwargs["safe_mode"] = safe_mode
        return keras.models.load_model(path, **kwargs)
    except Exception as exc:
        msg, cause = _explain_load_error(exc)
        raise WorkerFailure("could not load %s: %s" % (os.path.basename(path), msg),
                            cause=cause) from None


def stored_jit_compile(path: str):  # type: ignore[no-untyped-def]
    """jit_compile as model.compile() stored it in a .keras file (None: not stored)."""
    if model_format(path) != "keras":
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            cfg = json.loads(zf.read("config.json"))
    except Exception:
        return None
    return ((cfg or {}).get("compile_config") or {}).get("jit_compile")


def honour_stored_jit(model, path: str):  # type: ignore[no-untyped-def]
    """Loading with compile=False drops the jit_compile a .keras file stores; predict as the
    saved model did. Returns {"stored", "effective", "honoured"} (effective: what predict uses)."""
    stored = stored_jit_compile(path)
    honoured = None
    if isinstance(stored, bool) and hasattr(model, "jit_compile"):
        try:
            if model.jit_compile != stored:
                model.jit_compile = stored
            honoured = True
        except Exception:
            honoured = False
    effective = getattr(model, "jit_compile", None)
    return {"stored": stored, "effective": effective if isinstance(effective, bool) else None,
            "honoured": honoured}


_MISSING_MARKERS = ("could not locate", "unknown layer", "unknown object", "no module named",
                    "custom_objects")


def _explain_load_error(exc):  # type: ignore[no-untyped-def]
    """The most specific message in the exception chain: Keras wraps "Could not locate class
    'X'" in a generic "could not be deserialized properly"."""
    chain = []
    e = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):  # innermost first: the outer ones repeat it inside prose
        text = str(e).strip()
        low = text.lower()
        for marker in _MISSING_MARKERS:
            i = low.find(marker)
            if i >= 0:
                first = text[i:].splitlines()[0]
                end = first.find(". ")
                return (first[:end + 1] if end > 0 else first), "custom_object_missing"
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__), None


def _walk_config(node, found):  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        module = node.get("module")
        cls = node.get("class_name")
        cfg = node.get("config")
        if cls == "function" and isinstance(cfg, str) and ">" in cfg:
            # Keras 3 writes a registered function as module "builtins" with its registered
            # name ("package>name") as the config: it is the user's code all the same.
            key = ("<registered>", cfg)
            if found.get(key) is None:
                found[key] = cfg
        elif isinstance(cls, str) and ">" in cls and "module" not in node:
            # tf.keras (Keras 2) writes a registered class by its registered name alone.
            key = ("<registered>", cls)
            if found.get(key) is None:
                found[key] = cls
        elif isinstance(cls, str) and isinstance(module, str) and not is_builtin(module) \
                and not cls.startswith("__"):
            name = node.get("config") if cls == "function" else cls
            key = (module, name if isinstance(name, str) else cls)
            if found.get(key) is None:
                found[key] = node.get("registered_name")
        for v in node.values():
            _walk_config(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk_config(v, found)


def read_file_config(path: str):  # type: ignore[no-untyped-def]
    """The model config as stored in the file, without loading the model."""
    fmt = model_format(path)
    try:
        if fmt == "keras":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read("config.json"))
        if fmt == "h5":
            import h5py  # type: ignore
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                if raw is None:
                    return None
                return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        meta = _savedmodel_root_metadata(path)
        if meta is not None:
            return meta.get("model_config")
    except Exception:
        return None
    return None


def _savedmodel_root_metadata(path: str):  # type: ignore[no-untyped-def]
    """The root object's JSON in a tf.keras SavedModel's keras_metadata.pb (the one holding
    ``model_config`` and ``keras_version``), read without protobuf: every node's metadata is
    a JSON string, and the root's comes first."""
    meta = os.path.join(path, "keras_metadata.pb")
    if not os.path.exists(meta):
        return None
    with open(meta, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    dec = json.JSONDecoder()
    i = text.find('{"')
    while i >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find('{"', i + 1)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
            return obj
        i = text.find('{"', end)
    return None


def file_metadata(path: str):  # type: ignore[no-untyped-def]
    """Keras version and backend as the file records them. Legacy HDF5 files store them as
    variable-length strings, which only an HDF5 reader finds (the host reads no HDF5)."""
    found = {"keras_version": None, "backend": None}
    fmt = model_format(path)
    try:
        if fmt == "keras":
            with zipfile.ZipFile(path) as zf:
                if "metadata.json" in zf.namelist():
                    found.update({k: v for k, v in json.loads(zf.read("metadata.json")).items()
                                  if k in found})
        elif fmt == "h5":
            import h5py  # type: ignore
            with h5py.File(path, "r") as f:
                for key in found:
                    value = f.attrs.get(key)
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if value is not None:
                        found[key] = str(value)
        else:
            meta = _savedmodel_root_metadata(path)
            if meta is not None:
                found.update({k: meta.get(k) for k in found if meta.get(k) is not None})
    except Exception:
        pass
    return found


def _site_dirs():  # type: ignore[no-untyped-def]
    dirs = set()
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        with contextlib.suppress(Exception):
            dirs.add(os.path.realpath(sysconfig.get_paths()[key]))
    try:
        import site
        for d in [*site.getsitepackages(), site.getusersitepackages()]:
            dirs.add(os.path.realpath(d))
    except Exception:
        pass
    return [d for d in dirs if d]


def _sys_path_root(file_path: str, module: str):  # type: ignore[no-untyped-def]
    """The sys.path entry under which `module` was found, from its file and dotted name."""
    parts = module.split(".")
    root = os.path.dirname(os.path.realpath(file_path))
    is_pkg = os.path.basename(file_path) == "__init__.py"
    depth = len(parts) - (0 if is_pkg else 1)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def _registry_function(name):  # type: ignore[no-untyped-def]
    """keras.saving.<name>, else keras.utils.<name>, else tf.keras.utils.<name>: Keras 2.12's
    standalone ``keras.utils`` has get_registered_name but not get_registered_object."""
    keras = import_keras()
    holders = [getattr(keras, "saving", None), getattr(keras, "utils", None)]
    tf = import_tf()
    if tf is not None:
        with contextlib.suppress(Exception):
            holders.append(tf.keras.utils)
    for holder in holders:
        fn = getattr(holder, name, None)
        if fn is not None:
            return fn
    return None


def _registered(name):  # type: ignore[no-untyped-def]
    getter = _registry_function("get_registered_object")
    try:
        return getter(name) if getter is not None else None
    except Exception:
        return None


def _registered_name(obj):  # type: ignore[no-untyped-def]
    getter = _registry_function("get_registered_name")
    try:
        name = getter(obj) if getter is not None else None
    except Exception:
        return None
    # Unregistered objects come back under their bare class name.
    return name if isinstance(name, str) and ">" in name else None


def describe_object(module: str, name: str, registered, model_classes):  # type: ignore[no-untyped-def]
    obj = model_classes.get((module, name))
    if module == "<registered>":
        obj = _registered(name)
        module = getattr(obj, "__module__", None) or "<unknown>"
        name = getattr(obj, "__qualname__", name)
    if obj is None:
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = importlib.import_module(module)
            except Exception:
                mod = None
        obj = getattr(mod, name.split(".")[-1], None) if mod is not None else None
    entry = {
        "registered_name": registered,
        "module": module,
        "qualname": getattr(obj, "__qualname__", name),
        "kind": "function" if inspect.isfunction(obj) else "class",
        "source_sha256": None,
        "file": None,
        "file_sha256": None,
        "root": None,
        "in_site_packages": None,
        "importable": obj is not None,
        "stateful_attrs": [],
    }
    if obj is None:
        return entry
    try:
        src = inspect.getsource(obj)
        entry["source_sha256"] = hashlib.sha256(src.encode("utf-8")).hexdigest()
    except (OSError, TypeError):
        pass
    try:
        f = inspect.getsourcefile(obj)
    except TypeError:
        f = None
    if f and os.path.exists(f):
        real = os.path.realpath(f)
        entry["file"] = real
        with open(real, "rb") as fh:
            entry["file_sha256"] = hashlib.sha256(fh.read()).hexdigest()
        entry["in_site_packages"] = any(real.startswith(d + os.sep) for d in _site_dirs())
        if module != "__main__":
            entry["root"] = _sys_path_root(real, module)
    return entry


def _all_layers(model):  # type: ignore[no-untyped-def]
    return walk_layers(model, depth_first=True)


def custom_objects(model, config, passed=None) -> list:  # type: ignore[no-untyped-def,type-arg]
    """``passed``: objects given to load_model as custom_objects (functions Keras 3 writes as
    module "builtins" are known only from there)."""
    found = {}
    model_classes = {}
    for obj in [type(layer) for layer in _all_layers(model)] + list((passed or {}).values()):
        mod = getattr(obj, "__module__", None) or ""
        if not is_builtin(mod) and hasattr(obj, "__qualname__"):
            found.setdefault((mod, obj.__qualname__), _registered_name(obj))
            model_classes[(mod, obj.__qualname__)] = obj
    if config is not None:
        from_config = {}
        _walk_config(config, from_config)
        # A registered name the model's own classes already answer for is not another object.
        known = {r for r in found.values() if r}
        for key, registered in from_config.items():
            if not (key[0] == "<registered>" and key[1] in known):
                found.setdefault(key, registered)
    out = []
    seen = set()
    for (module, name), registered in sorted(found.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        entry = describe_object(module, str(name), registered, model_classes)
        key = (entry["module"], entry["qualname"])
        if key in seen:
            continue
        seen.add(key)
        out.append(entry)
    return out


def static_findings(model) -> list:  # type: ignore[no-untyped-def,type-arg]
    """Layers whose output depends on randomness at inference, found from the model itself."""
    keras = import_keras()
    findings = []
    random_bases = []
    for name in ("RandomFlip", "RandomRotation", "RandomZoom", "RandomCrop", "RandomContrast",
                 "RandomTranslation", "RandomBrightness", "GaussianNoise", "GaussianDropout",
                 "AlphaDropout", "Dropout", "SpatialDropout1D", "SpatialDropout2D"):
        cls = getattr(keras.layers, name, None)
        if cls is not None:
            random_bases.append(cls)
    for layer in _all_layers(model):
        if random_bases and isinstance(layer, tuple(random_bases)):
            cfg = {}
            with contextlib.suppress(Exception):
                cfg = layer.get_config()
            if cfg.get("training") is True or getattr(layer, "_envlock_force_training", False):
                findings.append({"code": "random_layers_active", "layer": layer.name,
                                 "evidence": "%s is random at inference" % type(layer).__name__})
    return findings


def untracked_arrays(model) -> list:  # type: ignore[no-untyped-def,type-arg]
    """numpy arrays held by layers as plain attributes: not variables, so not in the file.
    Drawn at construction (np.random in __init__), they are other arrays at every load."""
    out = []
    for layer in _all_layers(model):
        for attr, value in sorted(getattr(layer, "__dict__", {}).items()):
            if attr.startswith("__") or not isinstance(value, np.ndarray) or value.size < 2 \
                    or value.dtype.kind not in "fciub":
                continue
            out.append({"layer": getattr(layer, "name", type(layer).__name__), "attribute": attr,
                        "class": type(layer).__name__, "shape": [int(d) for d in value.shape],
                        "dtype": str(value.dtype), "sha256": array_sha256(value)})
    return out


def _flat_arrays(x) -> list:  # type: ignore[no-untyped-def,type-arg]
    if isinstance(x, dict):
        return [a for k in sorted(x, key=str) for a in _flat_arrays(x[k])]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _flat_arrays(v)]
    try:
        return [as_array(x)]
    except Exception:
        return []


def _same(a: list, b: list) -> bool:  # type: ignore[type-arg]
    return len(a) == len(b) and all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, b))


def _record_calls(model, layers, x, log):  # type: ignore[no-untyped-def]
    """Call the model once in inference mode, every layer's call() wrapped to append (layer,
    its inputs, its outputs) to ``log`` as it returns: the innermost layers come first."""
    originals = []
    for layer in layers:
        orig = layer.call

        def wrapped(*args, __orig=orig, __layer=layer, **kwargs):  # type: ignore[no-untyped-def]
            out = __orig(*args, **kwargs)
            log.append((__layer, _flat_arrays(args[:1]), _flat_arrays(out)))
            return out
        object.__setattr__(layer, "call", wrapped)
        originals.append(layer)
    try:
        model(x, training=False)
    finally:
        for layer in originals:
            with contextlib.suppress(Exception):
                object.__delattr__(layer, "call")


def _random_by_hooks(model, x):  # type: ignore[no-untyped-def]
    """Two eager calls, every layer's (nested ones too) inputs and outputs recorded: the
    innermost user-written layer given the same inputs twice and answering otherwise (a
    built-in layer there only does what the user's layer asks of it), else the innermost one."""
    layers = [layer for layer in walk_layers(model) if layer is not model]
    if not layers:
        return None
    first: list = []  # type: ignore[type-arg]
    second: list = []  # type: ignore[type-arg]
    _record_calls(model, layers, x, first)
    _record_calls(model, layers, x, second)
    if len(first) != len(second):
        return None
    random = [a[0] for a, b in zip(first, second)
              if a[0] is b[0] and _same(a[1], b[1]) and not _same(a[2], b[2])]
    for layer in random:
        if not is_builtin(type(layer).__module__):
            return layer.name
    return random[0].name if random else None


def _random_by_submodels(model, ins, x):  # type: ignore[no-untyped-def]
    """A functional model's layers, each as the output of a sub-model called twice."""
    keras = import_keras()
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            sub = keras.Model(ins, layer.output)
            a, b = sub(x, training=False), sub(x, training=False)
            if not _same(_flat_arrays(a), _flat_arrays(b)):
                return layer.name
        except Exception:
            return None
    return None


def random_layer(model, inputs):  # type: ignore[no-untyped-def]
    """The layer whose output differs between two calls on the same inputs in inference mode:
    a random op in call() that ignores ``training``. Functional or subclassed models, and
    layers nested in either. None when none differs (or the model cannot be called so)."""
    ins = getattr(model, "inputs", None)
    x = next(iter(inputs.values())) if len(inputs) == 1 else [inputs[k] for k in inputs]
    try:
        found = _random_by_hooks(model, x)
    except Exception:
        found = None
    if found is None and ins:
        found = _random_by_submodels(model, ins, x)
    return found


# -- specs -------------------------------------------------------------------------------

def _dtype_name(dt) -> str:  # type: ignore[no-untyped-def]
    return str(getattr(dt, "name", dt))


def _shape_list(shape):  # type: ignore[no-untyped-def]
    try:
        dims = shape.as_list()
    except AttributeError:
        dims = list(shape)
    return [None if d is None else int(d) for d in dims]


def _clean_name(name: str) -> str:
    name = str(name)
    return name[:-2] if name.endswith(":0") else name


def _signature_specs(sig):  # type: ignore[no-untyped-def]
    args, kwargs = sig
    specs = list(kwargs.items()) if kwargs else [("input_%d" % i, sp) for i, sp in enumerate(args)]
    return [{"name": n, "shape": _shape_list(sp.shape), "dtype": _dtype_name(sp.dtype)}
            for n, sp in sorted(specs)]


def _serving_signature(path: str):  # type: ignore[no-untyped-def]
    """A SavedModel's serving_default input signature, or None."""
    tf = import_tf()
    if tf is None or model_format(path) != "savedmodel":
        return None
    try:
        fn = tf.saved_model.load(path).signatures.get("serving_default")
    except Exception:
        return None
    return getattr(fn, "structured_input_signature", None)


def input_specs(model, path=None, given=None) -> list:  # type: ignore[no-untyped-def,type-arg]
    """The model's inputs: from its graph, a SavedModel's serving signature, else ``given``
    (what the host knows: the probe's arrays at save, the manifest later)."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        return [{"name": _clean_name(getattr(t, "name", "input_%d" % i)),
                 "shape": _shape_list(t.shape), "dtype": _dtype_name(t.dtype)}
                for i, t in enumerate(inputs)]
    # TFSMLayer (SavedModel under Keras 3): read the serving signature.
    endpoint = getattr(model, "call_endpoint_fn", None) or getattr(model, "_call_endpoint_fn", None)
    sig = getattr(endpoint, "structured_input_signature", None)
    if sig is not None:
        return _signature_specs(sig)
    if given:
        return [dict(sp) for sp in given]
    # A subclassed model in a Keras 2 SavedModel: the folder's own serving signature.
    sig = _serving_signature(path) if path else None
    if sig is not None:
        return _signature_specs(sig)
    raise WorkerFailure("cannot tell this model's inputs (a subclassed model?); pass --probe X.npz",
                        kind="input")


def unique_names(names) -> list:  # type: ignore[no-untyped-def,type-arg]
    """Names made unique, stably: the first keeps its name, the next ones get _1, _2... (skipping
    any name the list already holds). Keras 3 names every output of one layer after the layer."""
    taken = set(names)
    seen: set = set()  # type: ignore[type-arg]
    out = []
    for n in names:
        if n in seen:
            k = 1
            while "%s_%d" % (n, k) in taken:
                k += 1
            n = "%s_%d" % (n, k)
            taken.add(n)
        seen.add(n)
        out.append(n)
    return out


def output_names(model, n: int) -> list:  # type: ignore[no-untyped-def,type-arg]
    names = getattr(model, "output_names", None)
    if names and len(names) == n:
        return unique_names([str(x) for x in names])
    return ["output_%d" % i for i in range(n)]


# -- weights stored in the file itself -----------------------------------------------------

# Groups of a saved file that hold no state of what the model computes: an optimizer's (of the
# model, or of an inner model trained on its own before) and compiled metrics' counters.
_NOT_MODEL_STATE = ("optimizer", "optimizer_weights", "metrics", "compile_metrics")


def _keras_arrays(f, out):  # type: ignore[no-untyped-def]
    """A .keras file's model.weights.h5: <path of one layer>/vars/<i>, i in the layer's order."""
    import h5py  # type: ignore

    def visit(name, obj):  # type: ignore[no-untyped-def]
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


def _h5_arrays(f, out):  # type: ignore[no-untyped-def]
    """A legacy .h5 file: model_weights/<layer>/<weight name>, ordered by the layer's
    ``weight_names`` (the order in which Keras assigns them back)."""
    import h5py  # type: ignore
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

    def __init__(self, path, info):  # type: ignore[no-untyped-def]
        import struct
        self._fh = open(path, "rb")  # noqa: SIM115  (closed by close(), as a file object is)
        self._fh.seek(info.header_offset)
        header = self._fh.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        self._start = info.header_offset + 30 + name_len + extra_len
        self._size = info.file_size
        self._pos = 0

    def seek(self, offset, whence=0):  # type: ignore[no-untyped-def]
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self):  # type: ignore[no-untyped-def]
        return self._pos

    def readinto(self, buf):  # type: ignore[no-untyped-def]
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(view[:n]) if n else 0
        self._pos += got
        return got

    def read(self, n=-1):  # type: ignore[no-untyped-def]
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        buf = bytearray(max(0, n))
        return bytes(buf[:self.readinto(buf)])

    def close(self):  # type: ignore[no-untyped-def]
        self._fh.close()

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self.close()


def stored_weights(path: str) -> list:  # type: ignore[type-arg]
    """Every weight array stored in the model file: {"layer", "group", "index", "key", "sha256"}
    (see fingerprint.compare_with_stored). Optimizer state and metrics are left out."""
    fmt = model_format(path)
    out: list = []  # type: ignore[type-arg]
    if fmt == "keras":
        import io

        import h5py  # type: ignore
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
        import h5py  # type: ignore
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


def model_weights(model):  # type: ignore[no-untyped-def]
    weights = getattr(model, "weights", None)
    if weights is None:
        return []
    return list(weights)


def config_modules(config) -> list:  # type: ignore[no-untyped-def,type-arg]
    found = {}
    _walk_config(config, found)
    return sorted({module for module, _ in found if module not in ("__main__", "<registered>")})


def load_extra_modules(modules, sys_path, strict=True) -> list:  # type: ignore[no-untyped-def,type-arg]
    for p in reversed(sys_path or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    loaded = []
    for name in modules or []:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:
            if not strict:
                continue
            raise WorkerFailure("could not import custom-object module %s: %s" % (name, exc),
                                cause="custom_object_missing") from None
    return loaded


def as_array(x) -> np.ndarray:  # type: ignore[no-untyped-def]
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)
