"""Describe a loaded model: its custom objects, input/output specs, layers random at
inference and state held outside its variables. (Loading: loading.py; stored weights:
storedweights.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import sys
import sysconfig

import numpy as np

from .fingerprint import array_sha256, walk_layers
from .framework import import_keras, import_tf
from .loading import WorkerFailure, is_builtin, model_format, walk_config


def _site_dirs():
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


def _sys_path_root(file_path: str, module: str):
    """The sys.path entry under which `module` was found, from its file and dotted name."""
    parts = module.split(".")
    root = os.path.dirname(os.path.realpath(file_path))
    is_pkg = os.path.basename(file_path) == "__init__.py"
    depth = len(parts) - (0 if is_pkg else 1)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def _registry_function(name):
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


def _registered(name):
    getter = _registry_function("get_registered_object")
    try:
        return getter(name) if getter is not None else None
    except Exception:
        return None


def _registered_name(obj):
    getter = _registry_function("get_registered_name")
    try:
        name = getter(obj) if getter is not None else None
    except Exception:
        return None
    # Unregistered objects come back under their bare class name.
    return name if isinstance(name, str) and ">" in name else None


def describe_object(module: str, name: str, registered, model_classes):
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


def _all_layers(model):
    return walk_layers(model, depth_first=True)


def custom_objects(model, config, passed=None) -> list:
    """``passed``: objects given to load_model as custom_objects (functions Keras 3 writes as
    module "builtins" are known only from there)."""
    found: dict = {}
    model_classes = {}
    for obj in [type(layer) for layer in _all_layers(model)] + list((passed or {}).values()):
        mod = getattr(obj, "__module__", None) or ""
        if not is_builtin(mod) and hasattr(obj, "__qualname__"):
            found.setdefault((mod, obj.__qualname__), _registered_name(obj))
            model_classes[(mod, obj.__qualname__)] = obj
    if config is not None:
        from_config: dict = {}
        walk_config(config, from_config)
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


def static_findings(model) -> list:
    """Layers whose output depends on randomness at inference, found from the model itself."""
    keras = import_keras()
    findings = []
    random_bases: list = []
    for name in ("RandomFlip", "RandomRotation", "RandomZoom", "RandomCrop", "RandomContrast",
                 "RandomTranslation", "RandomBrightness", "GaussianNoise", "GaussianDropout",
                 "AlphaDropout", "Dropout", "SpatialDropout1D", "SpatialDropout2D"):
        cls = getattr(keras.layers, name, None)
        if cls is not None:
            random_bases.append(cls)
    for layer in _all_layers(model):
        if random_bases and any(isinstance(layer, base) for base in random_bases):
            cfg: dict = {}
            with contextlib.suppress(Exception):
                cfg = layer.get_config()
            if cfg.get("training") is True or getattr(layer, "_envlock_force_training", False):
                findings.append({"code": "random_layers_active", "layer": layer.name,
                                 "evidence": "%s is random at inference" % type(layer).__name__})
    return findings


def untracked_arrays(model) -> list:
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


def _flat_arrays(x) -> list:
    if isinstance(x, dict):
        return [a for k in sorted(x, key=str) for a in _flat_arrays(x[k])]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _flat_arrays(v)]
    try:
        return [as_array(x)]
    except Exception:
        return []


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, b))


def _record_calls(model, layers, x, log):
    """Call the model once in inference mode, every layer's call() wrapped to append (layer,
    its inputs, its outputs) to ``log`` as it returns: the innermost layers come first."""
    originals = []
    for layer in layers:
        orig = layer.call

        def wrapped(*args, __orig=orig, __layer=layer, **kwargs):
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


def _random_by_hooks(model, x):
    """Two eager calls, every layer's (nested ones too) inputs and outputs recorded: the
    innermost user-written layer given the same inputs twice and answering otherwise (a
    built-in layer there only does what the user's layer asks of it), else the innermost one."""
    layers = [layer for layer in walk_layers(model) if layer is not model]
    if not layers:
        return None
    first: list = []
    second: list = []
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


def _random_by_submodels(model, ins, x):
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


def random_layer(model, inputs):
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

def _dtype_name(dt) -> str:
    return str(getattr(dt, "name", dt))


def _shape_list(shape):
    try:
        dims = shape.as_list()
    except AttributeError:
        dims = list(shape)
    return [None if d is None else int(d) for d in dims]


def _clean_name(name: str) -> str:
    name = str(name)
    return name[:-2] if name.endswith(":0") else name


def _signature_specs(sig):
    args, kwargs = sig
    specs = list(kwargs.items()) if kwargs else [("input_%d" % i, sp) for i, sp in enumerate(args)]
    return [{"name": n, "shape": _shape_list(sp.shape), "dtype": _dtype_name(sp.dtype)}
            for n, sp in sorted(specs)]


def _serving_signature(path: str):
    """A SavedModel's serving_default input signature, or None."""
    tf = import_tf()
    if tf is None or model_format(path) != "savedmodel":
        return None
    try:
        fn = tf.saved_model.load(path).signatures.get("serving_default")
    except Exception:
        return None
    return getattr(fn, "structured_input_signature", None)


def input_specs(model, path=None, given=None) -> list:
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


def unique_names(names) -> list:
    """Names made unique, stably: the first keeps its name, the next ones get _1, _2... (skipping
    any name the list already holds). Keras 3 names every output of one layer after the layer."""
    taken = set(names)
    seen: set = set()
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


def output_names(model, n: int) -> list:
    names = getattr(model, "output_names", None)
    if names and len(names) == n:
        return unique_names([str(x) for x in names])
    return ["output_%d" % i for i in range(n)]


def model_weights(model):
    weights = getattr(model, "weights", None)
    if weights is None:
        return []
    return list(weights)


def as_array(x) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)
