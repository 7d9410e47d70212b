"""Import the model's framework and read (or apply) its settings, inside the worker.

Every value here is the *effective* one in this process, after the framework initialised:
the environment variable says what was asked for, the framework says what happened.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

ENV_VARS = (
    "TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "TF_CUDNN_DETERMINISTIC", "TF_XLA_FLAGS",
    "XLA_FLAGS", "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES", "TF_USE_LEGACY_KERAS", "KERAS_BACKEND",
    "TF_ENABLE_XLA", "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS",
    "TF_FORCE_GPU_ALLOW_GROWTH", "TF_GPU_ALLOCATOR", "NVIDIA_TF32_OVERRIDE",
)
# The variables as the process got them, before any framework ran: Keras' jax backend sets
# TF_FORCE_GPU_ALLOW_GROWTH itself on import, and that is not a setting of the user's.
# This module is imported before the framework (the worker's prepare imports it first).
ENV_AT_START = {k: os.environ.get(k) for k in ENV_VARS}
PACKAGES = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "keras",
            "tf-keras", "jax", "jaxlib", "torch", "numpy", "h5py", "ml-dtypes")


def _dist_version(name: str):
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:
        return None


def uses_legacy_keras() -> bool:
    return os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes")


def import_keras():
    """The Keras a user's `import keras` / `tf.keras` resolves to in this environment."""
    if uses_legacy_keras():
        try:
            import tf_keras as keras
            return keras
        except ImportError:
            pass
    try:
        import keras
        return keras
    except ImportError as exc:
        # Only where the keras package is absent (Keras 2 inside TensorFlow). An installed
        # Keras that fails (its backend missing) must say so, not hide behind tf.keras's lazy
        # loader, which would fail later and less clearly.
        if getattr(exc, "name", None) not in (None, "keras") or _dist_version("keras") is not None:
            raise
        from tensorflow import keras
        return keras


def import_tf():
    try:
        import tensorflow as tf
        return tf
    except ImportError:
        return None


def keras_version(keras) -> str:
    return str(getattr(keras, "__version__", None) or _dist_version("keras") or "")


def keras_backend(keras) -> str:
    cfg = getattr(keras, "config", None)
    if cfg is not None and hasattr(cfg, "backend"):
        return str(cfg.backend())
    return str(keras.backend.backend())


def requested_backend() -> str:
    """The backend Keras 3 would pick, read as Keras reads it, without importing Keras."""
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        import json
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except Exception:
        return "tensorflow"


def framework_facts() -> dict:
    """The framework's facts; where Keras cannot be imported (its backend is missing), those
    that package metadata gives, and the import error."""
    versions = {}
    for name in PACKAGES:
        v = _dist_version(name)
        if v is not None:
            versions[name] = v
    try:
        # tf.keras is a lazy loader that "imports" fine and fails on first use: use it here.
        keras = import_keras()
        kv, module, backend = keras_version(keras), keras.__name__, keras_backend(keras)
        import_error = None
    except Exception as exc:
        text = str(exc).strip()
        import_error = "%s: %s" % (type(exc).__name__, text.splitlines()[0] if text else "")
        kv = versions.get("tf-keras" if uses_legacy_keras() else "keras") or ""
        module, backend = None, requested_backend() if kv.startswith("3") else "tensorflow"
    try:
        tf = import_tf()
    except Exception:
        tf = None
    facts = {
        "versions": versions,
        "keras_version": kv,
        "keras_major": int(kv.split(".")[0] or 0) if kv else None,
        "keras_module": module,
        "backend": backend,
        "legacy_keras": uses_legacy_keras(),
        "tensorflow_version": getattr(tf, "__version__", None),
        "tf_build": None,
        "gpus_visible": [],
        "import_error": import_error,
    }
    if tf is not None:
        try:
            info = dict(tf.sysconfig.get_build_info())
            facts["tf_build"] = {
                "is_cuda_build": bool(info.get("is_cuda_build", False)),
                "is_rocm_build": bool(info.get("is_rocm_build", False)),
                "cuda_version": info.get("cuda_version"),
                "cudnn_version": info.get("cudnn_version"),
                "cuda_compute_capabilities": info.get("cuda_compute_capabilities"),
            }
        except Exception as exc:  # very old TF, or a broken build
            facts["tf_build"] = {"error": str(exc)}
        try:
            for dev in tf.config.list_physical_devices("GPU"):
                details = {}
                with contextlib.suppress(Exception):
                    details = dict(tf.config.experimental.get_device_details(dev))
                cc = details.get("compute_capability")
                facts["gpus_visible"].append({
                    "name": dev.name,
                    "device_name": details.get("device_name"),
                    "compute_capability": "%d.%d" % tuple(cc) if cc else None,
                })
        except Exception:
            pass
    return facts


def _onednn(tf) -> dict:
    requested = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    effective = None
    if tf is not None:
        try:
            from tensorflow.python.util import _pywrap_util_port
            effective = bool(_pywrap_util_port.IsMklEnabled())
        except Exception:
            effective = None
    return {"env": requested, "effective": effective}


def _op_determinism(tf):
    fn = getattr(tf.config.experimental, "is_op_determinism_enabled", None)
    if fn is None:  # not exported by every release; the internal one has been there since 2.8
        from tensorflow.python.framework import config as tf_config
        fn = tf_config.is_op_determinism_enabled
    return bool(fn())


def determinism_facts() -> dict:
    try:
        keras = import_keras()
    except Exception:  # its backend is missing: framework_facts says so
        keras = None
    try:
        tf = import_tf()
    except Exception:
        tf = None
    facts = {
        "env": dict(ENV_AT_START),
        "hash_randomization": bool(sys.flags.hash_randomization),
        "onednn": _onednn(tf),
        "op_determinism": None,
        "tf32": None,
        "intra_op_threads": None,
        "inter_op_threads": None,
        "jit": None,
        "cpu_count": os.cpu_count(),
        "dtype_policy": None,
        "floatx": None,
    }
    if tf is not None:
        cfg = tf.config
        for key, fn in (
            ("op_determinism", lambda: _op_determinism(tf)),
            ("tf32", lambda: cfg.experimental.tensor_float_32_execution_enabled()),
            ("intra_op_threads", lambda: cfg.threading.get_intra_op_parallelism_threads()),
            ("inter_op_threads", lambda: cfg.threading.get_inter_op_parallelism_threads()),
            ("jit", lambda: cfg.optimizer.get_jit()),
        ):
            try:
                value = fn()
                facts[key] = value if isinstance(value, (bool, int, str)) or value is None else str(value)
            except Exception:
                pass
    try:
        cfg = getattr(keras, "config", None)
        if cfg is not None and hasattr(cfg, "dtype_policy"):
            pol = cfg.dtype_policy()
        else:
            pol = keras.mixed_precision.global_policy()
        facts["dtype_policy"] = getattr(pol, "name", str(pol))
    except Exception:
        pass
    try:
        kcfg: Any = getattr(keras, "config", None)
        has = kcfg is not None and hasattr(kcfg, "floatx")
        facts["floatx"] = kcfg.floatx() if has else keras.backend.floatx()
    except Exception:
        pass
    return facts


def apply_settings(settings: dict) -> list:
    """Apply recorded in-process settings before the model is built. Returns what was applied.

    Threads must be set before TensorFlow runs its first op, so this runs before loading.
    """
    tf = import_tf()
    applied: list = []
    if tf is None:
        apply_dtypes(settings, applied)
        return applied
    cfg = tf.config
    if settings.get("op_determinism"):
        try:
            cfg.experimental.enable_op_determinism()
            applied.append("op_determinism")
        except Exception:
            pass
    if settings.get("tf32") is not None:
        try:
            cfg.experimental.enable_tensor_float_32_execution(bool(settings["tf32"]))
            applied.append("tf32")
        except Exception:
            pass
    for key, setter in (("intra_op_threads", cfg.threading.set_intra_op_parallelism_threads),
                        ("inter_op_threads", cfg.threading.set_inter_op_parallelism_threads)):
        if settings.get(key):
            try:
                setter(int(settings[key]))
                applied.append(key)
            except Exception:  # already initialised: recorded as not applied
                pass
    if settings.get("jit") not in (None, "", False):
        try:
            cfg.optimizer.set_jit(settings["jit"])
            applied.append("jit")
        except Exception:
            pass
    apply_dtypes(settings, applied)
    return applied


def apply_dtypes(settings: dict, applied: list, force: bool = False) -> None:
    """The global dtype policy and floatx. Unless ``force``, only a value other than Keras'
    default is applied (a policy set by the environment itself stays, and is reported)."""
    keras = None
    for key in ("floatx", "dtype_policy"):
        value = settings.get(key)
        if not value or (value == "float32" and not force):
            continue
        try:
            keras = keras or import_keras()
            cfg: Any = getattr(keras, "config", None)
            if key == "floatx":
                (cfg.set_floatx if hasattr(cfg, "set_floatx") else keras.backend.set_floatx)(value)
            elif hasattr(cfg, "set_dtype_policy"):
                cfg.set_dtype_policy(value)
            else:
                keras.mixed_precision.set_global_policy(value)
            applied.append(key)
        except Exception:
            pass


def apply_caller_settings(settings: dict) -> None:
    """Settings read from the process that called envlock.save, applied before each load of a
    (possibly reused) reload worker: dtype policy and floatx always, op determinism when on,
    TF32 and the global jit as the caller had them. (The thread pools cannot change once an op
    has run: the host gives them when it starts the worker, see apply_settings.)"""
    apply_dtypes(settings, [], force=True)
    tf = import_tf()
    if tf is None:
        return
    if settings.get("op_determinism"):
        with contextlib.suppress(Exception):
            tf.config.experimental.enable_op_determinism()
    if isinstance(settings.get("tf32"), bool):
        with contextlib.suppress(Exception):
            tf.config.experimental.enable_tensor_float_32_execution(settings["tf32"])
    if "jit" in settings and settings["jit"] is not None:
        with contextlib.suppress(Exception):
            tf.config.optimizer.set_jit(settings["jit"] or False)
