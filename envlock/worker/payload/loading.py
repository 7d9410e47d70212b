"""Load a model file, and read what it says without loading it: format, stored config and
metadata, the jit_compile it stores; import the modules its custom objects need."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import zipfile

from .framework import import_keras

BUILTIN_PREFIXES = ("keras", "tensorflow", "tf_keras", "builtins", "numpy", "keras_nlp",
                    "keras_cv", "keras_hub", "tensorflow_hub")


class WorkerFailure(Exception):
    """A failure the host shows as one line; ``cause`` is a DESIGN section 4 code."""

    def __init__(self, message: str, cause=None, kind="load"):
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


def load_model(path: str, safe_mode: bool = True, custom_objects=None):
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


def stored_jit_compile(path: str):
    """jit_compile as model.compile() stored it in a .keras file (None: not stored)."""
    if model_format(path) != "keras":
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            cfg = json.loads(zf.read("config.json"))
    except Exception:
        return None
    return ((cfg or {}).get("compile_config") or {}).get("jit_compile")


def honour_stored_jit(model, path: str):
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


def _explain_load_error(exc):
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


def walk_config(node, found):
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
            walk_config(v, found)
    elif isinstance(node, list):
        for v in node:
            walk_config(v, found)


def read_file_config(path: str):
    """The model config as stored in the file, without loading the model."""
    fmt = model_format(path)
    try:
        if fmt == "keras":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read("config.json"))
        if fmt == "h5":
            import h5py
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


def _savedmodel_root_metadata(path: str):
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


def file_metadata(path: str):
    """Keras version and backend as the file records them. Legacy HDF5 files store them as
    variable-length strings, which only an HDF5 reader finds (the host reads no HDF5)."""
    found: dict = {"keras_version": None, "backend": None}
    fmt = model_format(path)
    try:
        if fmt == "keras":
            with zipfile.ZipFile(path) as zf:
                if "metadata.json" in zf.namelist():
                    found.update({k: v for k, v in json.loads(zf.read("metadata.json")).items()
                                  if k in found})
        elif fmt == "h5":
            import h5py
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


def config_modules(config) -> list:
    found: dict = {}
    walk_config(config, found)
    return sorted({module for module, _ in found if module not in ("__main__", "<registered>")})


def load_extra_modules(modules, sys_path, strict=True) -> list:
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
