"""Custom code that a saved model needs at load time, captured from the process that saved it.

Two things live here, both on the host side of ``envlock.save`` (the training process):

- **The __main__ script.** Classes and functions defined in the training script are recorded
  by Keras under module ``__main__`` (classes) or ``builtins`` (functions), which no later
  process can import. ``capture_main`` builds ``code/__envlock_main__.py`` from the script's
  own syntax tree: the definitions the model needs, then, transitively, the top-level
  definitions, assignments and imports *those* use, found by free-name analysis; nothing
  else (not ``import envlock``, which is not in the locked environment, nor the code that
  trains). Definitions nested in ``if``/``try``/``with`` blocks are taken out and dedented.
  Local modules the captured code imports (the user's helpers, outside site-packages) are
  copied beside it, with the local modules *they* import.
- **Objects the file names only by registered name** (``package>name``): the saving process
  holds them, so their defining module is known here, and is imported in the reload worker.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import os
import site
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from envlock.sidecar.pyscope import bound_names, definitions, free_names

# Never captured: envlock is not part of the locked environment (the host brings it).
_NEVER = frozenset({"envlock"})


@dataclass
class MainCapture:
    """What ``code/`` must hold for the __main__ script's objects to import elsewhere."""

    source: str
    objects: dict[str, str]  # name Keras looks up → qualname in __envlock_main__
    helpers: dict[str, Path] = field(default_factory=dict)  # code/ relative path → file here
    helper_modules: dict[str, str] = field(default_factory=dict)  # module → code/ relative path
    warnings: list[str] = field(default_factory=list)


# -- which objects of __main__ the model needs ------------------------------------------------


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _registry_lookups() -> list[Any]:
    """get_registered_object of every Keras the saving process has imported (none is imported)."""
    found = []
    holders = (("keras", "saving"), ("tf_keras", "saving"), ("keras", "utils"), ("tf_keras", "utils"))
    for name, attr in holders:
        mod = sys.modules.get(name)
        holder = getattr(mod, attr, None) if mod is not None else None
        fn = getattr(holder, "get_registered_object", None)
        if fn is not None:
            found.append(fn)
    tf = sys.modules.get("tensorflow")
    with contextlib.suppress(Exception):
        if tf is not None and "keras" in sys.modules:
            found.append(tf.keras.utils.get_registered_object)
    return found


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a model's config, at any depth (the worker reads configs the same way)."""
    from envlock.worker.payload.customcode import _nodes as config_nodes

    return config_nodes(node)


def _named(config: Any) -> set[str]:
    """Names the config gives classes and functions. Keras 3 (and the Keras 2 `.keras` format)
    write every object as a dict with a class_name (functions: class_name "function", the name
    as config); a script's own `relu` must not be taken for the string "relu" of a built-in
    activation there. Legacy tf.keras configs name functions by bare string: any string then."""
    names: set[str] = set()
    legacy = True
    for node in _nodes(config):
        legacy = legacy and "module" not in node
        cls = node.get("class_name")
        if cls == "function" and isinstance(node.get("config"), str):
            names.add(node["config"])
        elif isinstance(cls, str):
            names.add(cls)
    return names | set(_strings(config)) if legacy else names


def registered_objects(config: Any) -> dict[str, Any]:
    """Objects of this process that the config names by registered name (``package>name``)."""
    lookups = _registry_lookups()
    out: dict[str, Any] = {}
    for s in set(_strings(config)):
        if ">" not in s or s.count(">") != 1 or " " in s:
            continue
        for get in lookups:
            obj = None
            with contextlib.suppress(Exception):
                obj = get(s)
            if obj is not None:
                out[s] = obj
                break
    return out


def main_objects(model: Any, config: Any) -> list[Any]:
    """Classes and functions defined in __main__ that the model uses: the classes of its layers
    (and their bases), and any __main__ class or function the saved config names, by plain or
    registered name (functions are written as module ``builtins``, so a name is all there is)."""
    found: list[Any] = []

    def add(obj: Any) -> None:
        if getattr(obj, "__module__", None) == "__main__" and not any(obj is f for f in found):
            found.append(obj)

    stack = [model]
    seen: list[Any] = []
    while stack:
        layer = stack.pop()
        if any(layer is s for s in seen):
            continue
        seen.append(layer)
        for cls in type(layer).__mro__:
            add(cls)
        subs = getattr(layer, "layers", None) or getattr(layer, "_layers", None) or []
        if isinstance(subs, (list, tuple)):
            stack.extend(subs)
    main = sys.modules.get("__main__")
    names = vars(main) if main is not None else {}
    for s in _named(config):
        obj = names.get(s)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            add(obj)
    for obj in registered_objects(config).values():
        add(obj)
    return found


def registered_modules(config: Any) -> list[str]:
    """Modules (not __main__, not Keras' own) defining objects the config names by registered
    name: Keras 3 writes a registered function's module as ``builtins``, so a fresh process
    cannot know what to import, but this one holds the object."""
    mods = set()
    for obj in registered_objects(config).values():
        mod = getattr(obj, "__module__", None)
        if mod and mod != "__main__" and mod.split(".")[0] not in _BUILTIN_TOPS:
            mods.add(mod)
    return sorted(mods)


_BUILTIN_TOPS = frozenset({"keras", "tensorflow", "tf_keras", "builtins", "numpy", "keras_nlp",
                           "keras_cv", "keras_hub", "tensorflow_hub"})


def read_config(path: Path) -> Any:
    """The saved model's config, read in this (the training) process; None if unreadable."""
    from envlock.worker.payload.loading import read_file_config  # numpy + stdlib; h5py only for .h5

    with contextlib.suppress(Exception):
        return read_file_config(os.fspath(path))
    return None


# -- local modules --------------------------------------------------------------------------------


def _outside_project_dirs() -> list[str]:
    dirs = set()
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        with contextlib.suppress(Exception):
            dirs.add(os.path.realpath(sysconfig.get_paths()[key]))
    with contextlib.suppress(Exception):
        for d in [*site.getsitepackages(), site.getusersitepackages()]:
            dirs.add(os.path.realpath(d))
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        dirs.add(os.path.realpath(prefix))
    return [d for d in dirs if d]


def _module_root(file: Path, module: str) -> Path:
    depth = len(module.split(".")) - (0 if file.name == "__init__.py" else 1)
    root = file.parent
    for _ in range(depth):
        root = root.parent
    return root


def local_module_file(name: str, outside: list[str]) -> tuple[Path, Path] | None:
    """(file, sys.path root) of an imported module that is the user's own (not installed, not
    the standard library, not envlock); None otherwise."""
    if name.split(".")[0] in _NEVER:
        return None
    mod = sys.modules.get(name)
    file = getattr(mod, "__file__", None) if isinstance(mod, ModuleType) else None
    if not file or not file.endswith(".py"):
        return None
    real = os.path.realpath(file)
    if any(real.startswith(d + os.sep) for d in outside):
        return None
    path = Path(real)
    return path, _module_root(path, name)


def _imported_modules(node: ast.Import | ast.ImportFrom, package: str | None = None) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level and package is not None:
        parts = package.split(".")
        base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
    out = [base] if base else []
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in sys.modules]
    return out


def copy_local_modules(modules: Iterable[str], into: MainCapture) -> None:
    """Add the user's own modules among ``modules`` to the capture, with their packages'
    ``__init__.py`` files and, transitively, the local modules they import themselves."""
    outside = _outside_project_dirs()
    todo = list(modules)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        found = local_module_file(name, outside)
        if found is None:
            continue
        file, root = found
        rel = file.relative_to(root).as_posix()
        into.helpers[rel] = file
        into.helper_modules[name] = rel
        parent = file.parent
        while parent != root and root in parent.parents:
            init = parent / "__init__.py"
            if init.is_file():
                into.helpers[init.relative_to(root).as_posix()] = init
            parent = parent.parent
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                todo.extend(_imported_modules(node, package))


# -- the capture ----------------------------------------------------------------------------------


def _node_source(lines: list[str], node: ast.stmt) -> str:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    end = node.end_lineno or node.lineno
    text = textwrap.dedent("".join(lines[start - 1:end]))
    try:
        ast.parse(text)
    except SyntaxError:  # e.g. a multi-line string at column 0 inside an indented block
        return ast.unparse(node) + "\n"
    return text


def _import_source(node: ast.Import | ast.ImportFrom, wanted: set[str]) -> str | None:
    if isinstance(node, ast.Import):
        names = [a for a in node.names if (a.asname or a.name.split(".")[0]) in wanted
                 and a.name.split(".")[0] not in _NEVER]
        return ast.unparse(ast.Import(names=names)) if names else None
    if (node.module or "").split(".")[0] in _NEVER and not node.level:
        return None
    names = [a for a in node.names if (a.asname or a.name) in wanted or a.name == "*"]
    if not names:
        return None
    return ast.unparse(ast.ImportFrom(module=node.module, names=names, level=node.level))


def _defining_line(obj: Any) -> int | None:
    with contextlib.suppress(OSError, TypeError):
        return inspect.getsourcelines(obj)[1]
    return None


def capture_main(objects: list[Any]) -> MainCapture:
    """``code/__envlock_main__.py`` for these __main__ objects (see the module docstring)."""
    names = {o.__name__: o.__qualname__ for o in objects}
    main = sys.modules.get("__main__")
    try:
        text = inspect.getsource(main) if main is not None else ""
        tree = ast.parse(text)
    except (OSError, TypeError, SyntaxError):
        return _capture_objects_only(objects, names)
    binders: dict[str, list[ast.stmt]] = {}
    for node in definitions(tree.body):
        for name in bound_names(node):
            binders.setdefault(name, []).append(node)
    if any(not binders.get(n) for n in names):
        return _capture_objects_only(objects, names)
    live = vars(main) if main is not None else {}
    chosen, wanted = _needed_statements(tree, binders, live, list(names))
    capture = MainCapture(source="", objects=names)
    capture.source, imported = _main_source(tree, text.splitlines(keepends=True), chosen, wanted)
    copy_local_modules(imported, capture)
    return capture


def _binders_of(name: str, binders: Mapping[str, list[ast.stmt]],
                live: Mapping[str, Any]) -> list[ast.stmt]:
    """The statements binding ``name`` that the capture takes."""
    nodes = binders.get(name, [])
    obj = live.get(name)
    line = _defining_line(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) \
        and getattr(obj, "__module__", None) == "__main__" else None
    if line is not None:
        # The definition that made the live object, where a name is defined more than once
        # (say in both branches of an `if`).
        exact = [n for n in nodes if line in {n.lineno, *(d.lineno for d in
                                                           getattr(n, "decorator_list", []))}]
        if exact:
            return exact
    return nodes


def _needed_statements(tree: ast.Module, binders: Mapping[str, list[ast.stmt]],
                       live: Mapping[str, Any],
                       todo: list[str]) -> tuple[dict[int, ast.stmt], set[str]]:
    """The top-level statements the names in ``todo`` need, transitively through the free
    names of what defines them (by id), and every name so reached."""
    chosen: dict[int, ast.stmt] = {}
    wanted: set[str] = set()
    # `from m import *` binds names no syntax tree shows: what is bound nowhere else may come
    # from there, so those imports go along whenever such a name is used.
    stars: list[ast.stmt] = [n for n in definitions(tree.body) if isinstance(n, ast.ImportFrom)
                             and any(a.name == "*" for a in n.names)]
    known = set(dir(builtins))
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        if name not in binders and name not in known:
            for node in stars:
                chosen[id(node)] = node
        for node in _binders_of(name, binders, live):
            if id(node) in chosen:
                continue
            chosen[id(node)] = node
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                todo.extend(free_names(node) - wanted)
    return chosen, wanted


def _main_source(tree: ast.Module, lines: list[str], chosen: Mapping[int, ast.stmt],
                 wanted: set[str]) -> tuple[str, list[str]]:
    """The text of ``__envlock_main__.py`` holding the chosen statements in script order, and
    the modules its imports name."""
    parts = ["# Captured by envlock from the __main__ script that defined these objects: the",
             "# definitions the model needs and what they use. Move them into a module of your",
             "# project: a script cannot be imported at load time."]
    if any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body):
        futures = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom)
                   and n.module == "__future__"]
        parts[:0] = futures
    imported: list[str] = []
    for node in sorted(chosen.values(), key=lambda n: n.lineno):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            src = _import_source(node, wanted)
            if src:
                parts.append(src)
                imported.extend(_imported_modules(node))
        else:
            parts.append("")
            parts.append(_node_source(lines, node).rstrip("\n"))
    return "\n".join(parts) + "\n", imported


def _capture_objects_only(objects: list[Any], names: dict[str, str]) -> MainCapture:
    """Without the script's source (an interactive session): each object's own source."""
    parts = ["# Captured by envlock from __main__ (its script was not readable): the objects",
             "# alone, without what they use. Move them into a module of your project."]
    capture = MainCapture(source="", objects=names)
    for obj in sorted(objects, key=lambda o: _defining_line(o) or 0):
        try:
            parts.append(textwrap.dedent(inspect.getsource(obj)))
        except (OSError, TypeError):
            capture.warnings.append(f"the source of {obj.__qualname__} (defined in __main__) is "
                                    "not available: it cannot be captured")
    capture.source = "\n".join(parts) + "\n"
    capture.warnings.append("the __main__ script's source was not readable: its objects were "
                            "captured without the imports and helpers they use")
    return capture


# -- modules passed with --custom-objects ---------------------------------------------------------


def module_record(fact: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of one module imported before loading, from the worker's facts."""
    return {"module": fact["module"], "sha256": fact.get("sha256"),
            "in_site_packages": fact.get("in_site_packages"),
            "distribution": fact.get("distribution"), "vendored": None}
