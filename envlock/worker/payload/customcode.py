"""Custom code in the worker: objects the model file names by module, and modules imported
before loading, described for the manifest (file hash, whether installed, which distribution).

Runs on Python 3.8 and newer, like the rest of the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys

from .loading import is_builtin
from .model import _site_dirs, _sys_path_root


def _nodes(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _nodes(v)


def config_objects(config) -> dict:
    """{name Keras looks up: object} for every class the file names by module and class name,
    where that module is imported already (at save: the file's own modules; at run: those the
    manifest records). Keras 3 imports only its own packages' modules when it resolves a class,
    so a class of an installed package that is not registered would not be found otherwise."""
    found: dict = {}
    for node in _nodes(config):
        module, cls = node.get("module"), node.get("class_name")
        if not isinstance(module, str) or not isinstance(cls, str) or is_builtin(module) \
                or module == "__main__" or cls == "function":
            continue
        mod = sys.modules.get(module)
        obj = getattr(mod, cls, None) if mod is not None else None
        if obj is None:
            continue
        registered = node.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            continue  # registered: Keras' registry answers for it
        for key in (registered, cls):
            if isinstance(key, str) and key:
                found.setdefault(key, obj)
    return found


def distribution_of(module: str):
    """{"name", "version"} of the installed distribution that holds top-level ``module``."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return None
    top = module.split(".")[0]
    names = []
    lookup = getattr(metadata, "packages_distributions", None)
    if lookup is not None:
        with contextlib.suppress(Exception):
            names = list(lookup().get(top, []))
    if not names:
        for dist in metadata.distributions():
            files = dist.files or []
            if any(f.parts and (f.parts[0] == top or f.parts[0] == top + ".py") for f in files):
                names.append(dist.metadata["Name"])
                break
    if not names:
        return None
    name = names[0]
    try:
        version = metadata.version(name)
    except Exception:
        return None
    return {"name": name, "version": version}


def describe_module(name: str):
    """What the manifest records of a module imported before loading (``--custom-objects``)."""
    mod = sys.modules.get(name)
    entry: dict = {"module": name, "file": None, "root": None, "sha256": None, "in_site_packages": None,
             "distribution": None}
    file = getattr(mod, "__file__", None)
    if not file or not os.path.exists(file):
        return entry
    real = os.path.realpath(file)
    with open(real, "rb") as fh:
        entry["sha256"] = hashlib.sha256(fh.read()).hexdigest()
    entry["file"] = real
    entry["in_site_packages"] = any(real.startswith(d + os.sep) for d in _site_dirs())
    if entry["in_site_packages"]:
        entry["distribution"] = distribution_of(name)
    else:
        entry["root"] = _sys_path_root(real, name)
    return entry


def add_distributions(entries) -> None:
    """Name the distribution of every custom object that lives in an installed package."""
    for e in entries:
        if e.get("in_site_packages") and e.get("module"):
            e["distribution"] = distribution_of(e["module"])
