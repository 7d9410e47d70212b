"""Explain differences between a sidecar and a target environment (DESIGN section 4).

Pure: it takes the manifest and what was observed on the target, and returns findings.
Every difference that can change predictions is a finding with a stable cause code, the
evidence (recorded and current value) and a fix. Findings are ranked by how likely each is
to explain a mismatch: a changed weight fingerprint outranks a patch release of numpy.
Differences that cannot change predictions (a CLI tool's version) are not causes; they are
kept apart as ``notes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# Cause codes and their prior likelihood of explaining a mismatch (higher first).
PRIORS: dict[str, int] = {
    "model_file_changed": 100,
    "weights_not_restored": 96,
    "custom_object_missing": 94,
    "custom_object_changed": 90,
    "keras_major_differs": 86,
    "backend_differs": 84,
    "dtype_policy_differs": 80,
    "random_layers_active": 76,
    "nondeterministic_model": 74,
    "package_versions_differ": 60,
    "onednn_differs": 58,
    "xla_differs": 56,
    "tf32_differs": 50,
    "gpu_differs": 46,
    "cuda_differs": 44,
    "python_version_differs": 40,
    "cpu_differs": 34,
    "op_determinism_off": 28,
    "threads_differ": 24,
}

# Packages whose version changes what a Keras/TensorFlow model computes.
NUMERIC_PACKAGES = frozenset({
    "tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tensorflow-metal",
    "tensorflow-io-gcs-filesystem", "keras", "tf-keras", "numpy", "h5py", "ml-dtypes", "jax",
    "jaxlib", "torch", "protobuf", "scipy", "keras-nlp", "keras-hub", "keras-cv", "tensorflow-hub",
    "tensorflow-text", "intel-extension-for-tensorflow",
})


@dataclass(frozen=True)
class Finding:
    code: str
    summary: str
    recorded: Any
    current: Any
    fix: str
    score: int
    rank: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = {"recorded": d.pop("recorded"), "current": d.pop("current")}
        return d


@dataclass
class Observed:
    """What the target showed. None where it could not be observed (e.g. the load failed)."""

    model_sha256: str | None = None
    python: Mapping[str, Any] | None = None
    platform: Mapping[str, Any] | None = None
    gpu: Mapping[str, Any] | None = None
    framework: Mapping[str, Any] | None = None
    determinism: Mapping[str, Any] | None = None
    packages: Mapping[str, str] | None = None
    custom_objects: list[Mapping[str, Any]] | None = None
    modules: list[Mapping[str, Any]] | None = None  # modules imported before loading, as here
    fingerprint: Mapping[str, Any] | None = None
    load_error: Mapping[str, Any] | None = None
    static_findings: list[Mapping[str, Any]] = field(default_factory=list)
    in_process_equal: bool | None = None
    cross_process_equal: bool | None = None
    custom_modules: frozenset[str] = frozenset()
    untracked_arrays: list[Mapping[str, Any]] | None = None  # layers' plain numpy attributes
    model_jit: bool | None = None  # the loaded model's jit_compile as it predicted here
    jit_not_honoured: Any = None  # the jit_compile a file stores, where it could not be applied
    # The shell's values of the recorded variables where envlock replaced them with the
    # recorded ones (None: the shell's values were passed through, --no-recorded-env).
    shell_env: Mapping[str, str | None] | None = None


def _minor(v: Any) -> str:
    return ".".join(str(v).split(".")[:2])


def _major(v: Any) -> str:
    return str(v).split(".")[0]


class _Collector:
    def __init__(self, mismatch: bool) -> None:
        self.items: list[Finding] = []
        self.notes: list[dict[str, Any]] = []
        self.mismatch = mismatch

    def add(self, code: str, summary: str, recorded: Any, current: Any, fix: str, *, bonus: int = 0,
            **details: Any) -> None:
        if any(f.code == code for f in self.items):
            return
        self.items.append(Finding(code, summary, recorded, current, fix, PRIORS[code] + bonus,
                                  details=details))

    def has(self, code: str) -> bool:
        return any(f.code == code for f in self.items)

    def annotate(self, code: str, also: str, **details: Any) -> None:
        """Add evidence to a finding already made (findings are frozen: replaced)."""
        self.items = [replace(f, summary=f"{f.summary}; {also}", details={**f.details, **details})
                      if f.code == code else f for f in self.items]

    def ranked(self) -> list[Finding]:
        order = sorted(self.items, key=lambda f: -f.score)
        return [Finding(f.code, f.summary, f.recorded, f.current, f.fix, f.score, i + 1, f.details)
                for i, f in enumerate(order)]


def _initial_value_hashes(var: Mapping[str, Any]) -> set[str]:
    """The hashes a variable of this shape and dtype has at its usual initial values (zeros for
    biases, betas and moving means; ones for gammas and moving variances)."""
    import numpy as np

    from envlock._worker.fingerprint import array_sha256

    try:
        shape, dtype = tuple(int(d) for d in var["shape"]), np.dtype(var["dtype"])
    except (KeyError, TypeError, ValueError):
        return set()
    return {array_sha256(np.zeros(shape, dtype)), array_sha256(np.ones(shape, dtype))}


def compare_variables(recorded: list[Mapping[str, Any]], current: list[Mapping[str, Any]]
                      ) -> dict[str, Any]:
    """The recorded and current variables matched by path, summed up per layer.

    A layer is unchanged, changed, new (only here) or gone (only at save); a gone and a new
    layer whose variables have the same shapes, in order, are one layer renamed. A variable
    that differs and now holds its initial value (all zeros or all ones where the recorded one
    did not) says the layer's weights were never loaded into it.
    """
    from envlock._worker.fingerprint import layer_of

    rec = {str(v["path"]): v for v in recorded}
    cur = {str(v["path"]): v for v in current}
    layers: dict[str, dict[str, list[str]]] = {}

    def mark(layer: str, state: str, var: str) -> None:
        layers.setdefault(layer, {}).setdefault(state, []).append(var)

    initial: list[str] = []
    for path, v in cur.items():
        r = rec.get(path)
        if r is None:
            mark(layer_of(path), "new", path)
        elif r["sha256"] == v["sha256"]:
            mark(layer_of(path), "unchanged", path)
        else:
            mark(layer_of(path), "changed", path)
            if v["sha256"] in _initial_value_hashes(v) and r["sha256"] not in _initial_value_hashes(r):
                initial.append(path)
    for path in rec:
        if path not in cur:
            mark(layer_of(path), "gone", path)
    gone = [k for k, st in layers.items() if set(st) == {"gone"}]
    new = [k for k, st in layers.items() if set(st) == {"new"}]
    renamed: dict[str, str] = {}
    for g in gone:
        shapes = [rec[p]["shape"] for p in layers[g]["gone"]]
        for n in new:
            if n not in renamed.values() and [cur[p]["shape"] for p in layers[n]["new"]] == shapes:
                renamed[g] = n
                break
    for g, n in renamed.items():
        pairs = list(zip(layers[g]["gone"], layers[n]["new"]))
        if all(rec[a]["sha256"] == cur[b]["sha256"] for a, b in pairs):
            continue
        for a, b in pairs:
            if rec[a]["sha256"] != cur[b]["sha256"] and cur[b]["sha256"] in _initial_value_hashes(cur[b]) \
                    and rec[a]["sha256"] not in _initial_value_hashes(rec[a]):
                initial.append(b)

    def state(st: dict[str, list[str]]) -> str:
        if set(st) == {"unchanged"}:
            return "unchanged"
        if set(st) == {"new"}:
            return "new"
        if set(st) == {"gone"}:
            return "gone"
        return "changed"

    by_state: dict[str, list[str]] = {"unchanged": [], "changed": [], "new": [], "gone": []}
    for layer, st in layers.items():
        by_state[state(st)].append(layer)
    for g, n in renamed.items():
        by_state["gone"].remove(g)
        by_state["new"].remove(n)
        same = all(rec[a]["sha256"] == cur[b]["sha256"]
                   for a, b in zip(layers[g]["gone"], layers[n]["new"]))
        (by_state["unchanged"] if same else by_state["changed"]).append(n)
    return {**{k: sorted(v) for k, v in by_state.items()}, "renamed": renamed,
            "initial_values": sorted({layer_of(p) for p in initial}),
            "initial_variables": sorted(initial)}


def _model(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    rec = m["model"]["sha256"]
    if o.model_sha256 is not None and o.model_sha256 != rec:
        _changed_file(m, o, c, m.get("weights") or {})
    w = m.get("weights") or {}
    custom = [str(x.get("qualname")) for x in m.get("custom_objects") or [] if x.get("kind") == "class"]
    fix = ("give the custom layer ({}) a build() that creates its weights (and do not override "
           "load_own_variables without restoring them), then save again".format(", ".join(custom))
           if custom else "the model has no custom layer: save it again with Keras and `envlock save`; "
           "if the weights still differ, report it to envlock")
    if w.get("restored") is False:
        here = None if o.fingerprint is None else (
            "same weights as at save" if o.fingerprint.get("overall") == w.get("overall")
            else "other weights than at save")
        c.add("weights_not_restored",
              f"at save, layer(s) {', '.join(w.get('mismatched_layers') or [])} did not get their "
              "weights back when the file was loaded", "not restored (saved with --allow-mismatch)",
              here, fix, layers=w.get("mismatched_layers"))
    elif o.fingerprint is not None and o.model_sha256 in (None, rec) \
            and o.fingerprint.get("overall") != w.get("overall"):
        rec_vars = w.get("variables") or []
        cur_vars = o.fingerprint.get("variables") or []
        layers = sorted({str(cv["path"]).rsplit("/", 1)[0] for rv, cv in zip(rec_vars, cur_vars)
                         if rv["sha256"] != cv["sha256"]})
        c.add("weights_not_restored", "the weights loaded from the unchanged file differ from "
              f"those recorded at save (layers: {', '.join(layers) or 'variable count differs'})",
              w.get("overall"), o.fingerprint.get("overall"), fix, layers=layers)


_CODE_HASHES = (("class", "source_sha256"), ("module", "file_sha256"))


def _changed_file(m: Mapping[str, Any], o: Observed, c: _Collector, w: Mapping[str, Any]) -> None:
    """The file differs from the one saved: say what in it differs, weight by weight."""
    rec = m["model"]["sha256"]
    name = m["model"]["file"]
    restore = f"restore the original {name} (sha256 {rec[:12]}… in the sidecar)"
    if o.fingerprint is None or not w.get("variables"):
        c.add("model_file_changed", f"{name} was modified after it was saved (it could not be "
              "loaded to compare its weights)", rec, o.model_sha256,
              f"{restore}; saving again would lock in whatever changed")
        return
    diff = compare_variables(w.get("variables") or [], o.fingerprint.get("variables") or [])
    parts = []
    for key, label in (("changed", "changed"), ("new", "new"), ("gone", "gone")):
        if diff[key]:
            parts.append(f"{label}: {', '.join(diff[key])}")
    if diff["renamed"]:
        parts.append("renamed: " + ", ".join(f"{a} → {b}" for a, b in diff["renamed"].items()))
    what = "; ".join(parts) if parts else "its weights are all the same (only the file's other " \
        "content changed)"
    c.add("model_file_changed", f"{name} was modified after it was saved; layers {what}",
          rec, o.model_sha256,
          f"{restore}; to see what changed, compare the layers listed (saving again would lock "
          "the change in)",
          bonus=0 if parts else -40, **{k: diff[k] for k in ("unchanged", "changed", "new", "gone",
                                                             "renamed")})
    if diff["initial_values"]:
        layers = diff["initial_values"]
        c.add("weights_not_restored",
              f"layer(s) {', '.join(layers)} hold their initial values in the new file (variables "
              f"{', '.join(diff['initial_variables'])} are all zeros or ones, and were not at save): "
              "their weights were never loaded into them",
              {"layers": layers, "at_save": "trained values"}, {"layers": layers, "here": "initial values"},
              "load the weights under the layer names they were saved with (load_weights(by_name=True, "
              "skip_mismatch=True) silently skips a renamed layer), or restore the original file",
              bonus=6, layers=layers, variables=diff["initial_variables"],
              renamed=diff["renamed"])


def _custom(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    if o.load_error is not None and o.load_error.get("cause") == "custom_object_missing":
        c.add("custom_object_missing", f"the model does not load: {o.load_error.get('message')}",
              [f"{x['module']}.{x['qualname']}" for x in m.get("custom_objects", [])], None,
              "make the module importable (install its package, or run with the sidecar's code/ "
              "trusted: --trust-code), or pass --custom-objects MODULE")
    if o.custom_objects is None:
        return
    current = {(x.get("registered_name") or f"{x['module']}.{x['qualname']}"): x for x in o.custom_objects}
    changed: list[tuple[str, Mapping[str, Any], Mapping[str, Any], list[str]]] = []
    for rec in m.get("custom_objects", []):
        key = rec.get("registered_name") or f"{rec['module']}.{rec['qualname']}"
        cur = current.get(key)
        if cur is None or not cur.get("importable", True):
            c.add("custom_object_missing", f"custom object {key} is not available at load", key, None,
                  f"install or put on the path the module {rec['module']} (the sidecar has its source"
                  f"{' in ' + rec['vendored'] if rec.get('vendored') else ''})")
        else:
            # The class's own text, and the whole module that defines it (a module-level helper
            # the class calls changes what it computes as much as its own code does).
            parts = [p for p, k in _CODE_HASHES if rec.get(k) and cur.get(k) and rec[k] != cur[k]]
            if parts:
                changed.append((key, rec, cur, parts))
    # One finding: the object whose own source changed explains more than a module-mate.
    for key, rec, cur, parts in sorted(changed, key=lambda t: "class" not in t[3]):
        what = ("its source" if parts == ["class"] else
                f"its defining module {cur.get('module')} (its own source is unchanged)"
                if parts == ["module"] else f"its source and its defining module {cur.get('module')}")
        c.add("custom_object_changed", f"{key} is bound to different code than at save: {what} changed",
              {p: rec.get(k) for p, k in _CODE_HASHES}, {p: cur.get(k) for p, k in _CODE_HASHES},
              f"use the source saved with the model ({rec.get('vendored') or 'see REPRODUCE.md'}), or "
              "save again if the change is intended", module=cur.get("module"),
              file=cur.get("file"), changed=parts,
              # Only the module around it changed: it may or may not touch what the object
              # computes (a helper it calls, or a global setting), so a setting that differs
              # for certain ranks above it.
              bonus=-12 if parts == ["module"] else 0)


def _custom_modules(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    """The modules imported before loading at save (--custom-objects: say, one that only
    registers classes, or sets what they read) against the copies imported here."""
    current = {f.get("module"): f for f in o.modules or []}
    changed = [(rec, current[rec["module"]]) for rec in m.get("custom_object_modules") or []
               if rec.get("sha256") and (current.get(rec["module"]) or {}).get("sha256")
               and current[rec["module"]]["sha256"] != rec["sha256"]]
    if not changed:
        return
    names = ", ".join(rec["module"] for rec, _ in changed)
    what = f"the module(s) {names} imported before loading (--custom-objects) changed since save"
    modules = [rec["module"] for rec, _ in changed]
    files = [cur.get("file") for _, cur in changed]
    if c.has("custom_object_changed"):
        c.annotate("custom_object_changed", what, modules=modules, module_files=files)
        return
    c.add("custom_object_changed", what[0].upper() + what[1:],
          {rec["module"]: rec["sha256"] for rec, _ in changed},
          {rec["module"]: cur["sha256"] for rec, cur in changed},
          "use the copies saved with the model ("
          + ", ".join(rec.get("vendored") or rec["module"] for rec, _ in changed)
          + "), or save again if the change is intended", modules=modules, module_files=files)


_BACKEND_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch",), "tensorflow": ("tensorflow",),
                     "numpy": ("numpy",)}


def _framework(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    rec = m.get("framework") or {}
    cur = o.framework
    if cur is None:
        return
    if rec.get("keras_major") is not None and cur.get("keras_major") is not None \
            and int(rec["keras_major"]) != int(cur["keras_major"]):
        c.add("keras_major_differs", f"saved with Keras {rec.get('keras_version')}, loaded with Keras "
              f"{cur.get('keras_version')}", rec.get("keras_version"), cur.get("keras_version"),
              f"run in the locked environment (`envlock run`), or install keras=={rec.get('keras_version')}"
              " (for Keras 2 under TF >= 2.16: tf_keras with TF_USE_LEGACY_KERAS=1)")
    backend = rec.get("backend")
    if backend and cur.get("import_error") and cur.get("backend") == backend:
        # Keras was asked for the recorded backend and could not import it.
        versions = cur.get("versions") or {}
        wanted = (rec.get("versions") or {})
        missing = [p for p in _BACKEND_PACKAGES.get(str(backend), (str(backend),))
                   if p not in versions and (p in wanted or p == backend)]
        pins = " ".join(f"{p}=={wanted[p]}" if p in wanted else p for p in missing) or str(backend)
        c.add("backend_differs", f"the recorded Keras backend {backend} cannot be used here: "
              + (f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} not installed"
                 if missing else str(cur["import_error"])),
              backend, None,
              f"install {pins} (or run in the locked environment: `envlock run`, which has it)",
              missing_packages=missing, error=cur["import_error"])
    elif backend and cur.get("backend") and backend != cur["backend"]:
        c.add("backend_differs", "another Keras backend", backend, cur["backend"],
              f"set KERAS_BACKEND={backend}")


def _packages(m: Mapping[str, Any], locked: Mapping[str, str], o: Observed, c: _Collector) -> None:
    if o.packages is None or not locked:
        return
    ignore = {"envlock", "pip", "setuptools", "wheel", "uv"}
    changed: dict[str, tuple[str | None, str | None]] = {}
    for name in sorted(set(locked) | set(o.packages)):
        if name in ignore:
            continue
        a, b = locked.get(name), o.packages.get(name)
        if a != b:
            changed[name] = (a, b)
    if not changed:
        return
    matter = {k: v for k, v in changed.items()
              if k in NUMERIC_PACKAGES or k.startswith("nvidia-") or k in o.custom_modules}
    rest = {k: v for k, v in changed.items() if k not in matter}
    if matter:
        bonus = 0
        # A major or minor release of TensorFlow/Keras/numpy changes kernels; a patch rarely does.
        if any(a and b and _minor(a) != _minor(b) for a, b in matter.values()):
            bonus = 10
        names = ", ".join(f"{k} {a or '-'} → {b or '-'}" for k, (a, b) in matter.items())
        c.add("package_versions_differ", f"packages that change what the model computes differ: {names}",
              {k: a for k, (a, _) in matter.items()}, {k: b for k, (_, b) in matter.items()},
              "run in the locked environment (`envlock run`), or `uv pip sync "
              "MODEL.envlock/requirements.lock.txt`", bonus=bonus, packages=sorted(matter))
    if rest:
        c.notes.append({"what": "other packages differ (cannot change predictions)",
                        "packages": {k: {"recorded": a, "current": b} for k, (a, b) in rest.items()}})


def _python(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    rec = (m.get("python") or {}).get("version")
    cur = (o.python or {}).get("version")
    if rec and cur and rec != cur:
        minor = _minor(rec) != _minor(cur)
        c.add("python_version_differs", f"Python {cur} instead of {rec}", rec, cur,
              f"run with Python {rec} (`uv python install {rec}`; envlock run finds it)",
              bonus=0 if minor else -20)


def _determinism(m: Mapping[str, Any], o: Observed, c: _Collector, on_gpu: bool) -> None:
    rec = m.get("determinism") or {}
    cur = o.determinism
    if cur is None:
        return
    r1, c1 = (rec.get("onednn") or {}).get("effective"), (cur.get("onednn") or {}).get("effective")
    if r1 is not None and c1 is not None and r1 != c1:
        c.add("onednn_differs", f"oneDNN optimisations {'on' if c1 else 'off'} here, "
              f"{'on' if r1 else 'off'} at save", r1, c1,
              f"set TF_ENABLE_ONEDNN_OPTS={'1' if r1 else '0'} (envlock run does, unless "
              "--no-recorded-env)")
    if rec.get("tf32") is not None and cur.get("tf32") is not None and rec["tf32"] != cur["tf32"]:
        c.add("tf32_differs", "TensorFloat-32 differs", rec["tf32"], cur["tf32"],
              f"tf.config.experimental.enable_tensor_float_32_execution({rec['tf32']})",
              bonus=0 if on_gpu else -30)
    if (rec.get("dtype_policy") or "float32") != (cur.get("dtype_policy") or "float32") \
            or (rec.get("floatx") or "float32") != (cur.get("floatx") or "float32"):
        c.add("dtype_policy_differs", f"global dtype policy {cur.get('dtype_policy')} (floatx "
              f"{cur.get('floatx')}) here, {rec.get('dtype_policy')} (floatx {rec.get('floatx')}) at save",
              rec.get("dtype_policy"), cur.get("dtype_policy"),
              f"keras.config.set_dtype_policy({rec.get('dtype_policy')!r}) before loading, and remove "
              "whatever sets the policy globally")
    renv, cenv = rec.get("env") or {}, cur.get("env") or {}
    xla_keys = ("TF_XLA_FLAGS", "XLA_FLAGS", "TF_ENABLE_XLA")
    # The model's own jit_compile (stored in a .keras file by compile(jit_compile=True)) as the
    # predicting model had it: at save, and here.
    rjit, cjit = (m.get("model") or {}).get("jit_compile"), o.model_jit
    model_jit_differs = rjit is not None and cjit is not None and bool(rjit) != bool(cjit)
    if (rec.get("jit") or "") != (cur.get("jit") or "") or model_jit_differs \
            or any(renv.get(k) != cenv.get(k) for k in xla_keys):
        fix = "use the recorded XLA settings (unset TF_XLA_FLAGS / tf.config.optimizer.set_jit(False))"
        if model_jit_differs:
            fix = (f"predict with model.jit_compile = {bool(rjit)} as at save (the file as saved stored "
                   f"jit_compile={(m.get('model') or {}).get('stored_jit_compile')}; envlock run "
                   "honours what the file stores)")
        c.add("xla_differs", "XLA / auto-jit settings differ"
              + (f": the model predicted with jit_compile={bool(rjit)} at save and {bool(cjit)} here"
                 if model_jit_differs else ""),
              {"jit": rec.get("jit"), "model_jit_compile": rjit, **{k: renv.get(k) for k in xla_keys}},
              {"jit": cur.get("jit"), "model_jit_compile": cjit, **{k: cenv.get(k) for k in xla_keys}},
              fix, bonus=20 if model_jit_differs else 0)
    if o.jit_not_honoured is not None:
        c.notes.append({"what": f"the file stores jit_compile={o.jit_not_honoured}, which could not be "
                                "applied to the loaded model here: it predicted without it"})
    rec_ops = renv.get("TF_DETERMINISTIC_OPS")
    if (rec.get("op_determinism") and not cur.get("op_determinism")) or \
            (rec_ops and rec_ops != cenv.get("TF_DETERMINISTIC_OPS")):
        how = [] if not rec_ops else [f"TF_DETERMINISTIC_OPS={rec_ops}"]
        if rec.get("op_determinism"):
            how.append("tf.config.experimental.enable_op_determinism()")
        c.add("op_determinism_off", "op determinism was on at save and is off here",
              {"op_determinism": rec.get("op_determinism"), "TF_DETERMINISTIC_OPS": rec_ops},
              {"op_determinism": cur.get("op_determinism"),
               "TF_DETERMINISTIC_OPS": cenv.get("TF_DETERMINISTIC_OPS")},
              f"turn it on as at save: {' and '.join(how)} (envlock run applies the recorded "
              "settings unless --no-recorded-env)")
    # Thread pools exist only where TensorFlow runs the model: a model saved (or run) with
    # another backend has no TensorFlow thread settings to compare.
    tf_both = (m.get("framework") or {}).get("backend", "tensorflow") == "tensorflow" \
        and (o.framework or {}).get("backend", "tensorflow") == "tensorflow" \
        and rec.get("intra_op_threads") is not None and cur.get("intra_op_threads") is not None
    thread_keys = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
    rt = (rec.get("intra_op_threads"), rec.get("inter_op_threads"), rec.get("cpu_count"))
    ct = (cur.get("intra_op_threads"), cur.get("inter_op_threads"), cur.get("cpu_count"))
    env_differs = any(renv.get(k) != cenv.get(k) for k in thread_keys)
    if tf_both and (rt[:2] != ct[:2] or (rt[:2] == (0, 0) and rt[2] != ct[2]) or env_differs):
        c.add("threads_differ", "thread settings (or the core count TensorFlow sizes its pools by) differ",
              {"intra": rt[0], "inter": rt[1], "cpus": rt[2],
               **{k: renv.get(k) for k in thread_keys if renv.get(k) or cenv.get(k)}},
              {"intra": ct[0], "inter": ct[1], "cpus": ct[2],
               **{k: cenv.get(k) for k in thread_keys if renv.get(k) or cenv.get(k)}},
              "use the recorded thread settings ("
              + ", ".join(f"{k}={renv.get(k)}" for k in thread_keys if renv.get(k))
              + ("; " if any(renv.get(k) for k in thread_keys) else "")
              + "tf.config.threading.set_intra_op/inter_op_parallelism_threads at save and run): "
              "reductions split work by thread count")


def _hardware(m: Mapping[str, Any], o: Observed, c: _Collector) -> bool:
    rgpus = [g.get("name") for g in ((m.get("gpu") or {}).get("gpus") or [])]
    cgpus = [g.get("name") for g in ((o.gpu or {}).get("gpus") or [])] if o.gpu is not None else None
    # A GPU the framework did not see (a CPU-only build, CUDA_VISIBLE_DEVICES="") computed
    # nothing: when the model ran on the CPU at save and here, the GPUs and their CUDA stack
    # are unlikely causes, and the CPU is the likelier one.
    rseen = (m.get("framework") or {}).get("gpus_visible")
    cseen = (o.framework or {}).get("gpus_visible")
    cpu_only = isinstance(rseen, list) and isinstance(cseen, list) and not rseen and not cseen
    unused = -25 if cpu_only else 0
    if cgpus is not None and rgpus != cgpus:
        here, then = ", ".join(cgpus) or "none", ", ".join(rgpus) or "none"
        idle = "; the framework used none of them (it ran on the CPU at save and here)" if cpu_only else ""
        c.add("gpu_differs", f"GPU {here} here, {then} at save{idle}",
              rgpus, cgpus, "kernels differ between GPU models (and between GPU and CPU); compare "
              "within tolerance, or run on the recorded GPU",
              bonus=(5 if (rgpus or cgpus) else 0) + unused, framework_used_gpu=not cpu_only)
    rcuda = m.get("cuda") or {}
    rec_c = (rcuda.get("cuda_version"), rcuda.get("cudnn_version"),
             (m.get("gpu") or {}).get("cuda_driver_version"))
    fw = o.framework or {}
    build = fw.get("tf_build") or {}
    cur_c = (build.get("cuda_version"), build.get("cudnn_version"), (o.gpu or {}).get("cuda_driver_version"))
    if o.framework is not None and o.gpu is not None and rec_c != cur_c:
        c.add("cuda_differs", "CUDA / cuDNN / driver versions differ",
              dict(zip(("cuda", "cudnn", "driver_cuda"), rec_c)),
              dict(zip(("cuda", "cudnn", "driver_cuda"), cur_c)),
              "use the recorded CUDA stack (the nvidia-* wheels are in the lock; the driver must "
              "support its CUDA version)", bonus=unused, framework_used_gpu=not cpu_only)
    rcpu = ((m.get("platform") or {}).get("cpu") or {})
    ccpu = ((o.platform or {}).get("cpu") or {}) if o.platform is not None else None
    if ccpu is not None and rcpu:
        rflags, cflags = set(rcpu.get("numeric_flags") or []), set(ccpu.get("numeric_flags") or [])
        if rcpu.get("model") != ccpu.get("model") or rflags != cflags:
            c.add("cpu_differs", f"CPU {ccpu.get('model')} here, {rcpu.get('model')} at save",
                  {"model": rcpu.get("model"), "flags_only_at_save": sorted(rflags - cflags)},
                  {"model": ccpu.get("model"), "flags_only_here": sorted(cflags - rflags)},
                  "oneDNN and Eigen pick kernels by CPU features (AVX-512, AMX): compare within "
                  "tolerance, or set TF_ENABLE_ONEDNN_OPTS=0 at save and run",
                  bonus=6 if rflags != cflags else 0)
    return bool(rgpus or cgpus) and not cpu_only


def _randomness(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    untracked: list[Mapping[str, Any]] = []
    for s in [*(m.get("static_findings") or []), *o.static_findings]:
        if s.get("code") == "random_layers_active":
            c.add("random_layers_active",
                  f"layer {s.get('layer')} is random at inference: {s.get('evidence')}", None,
                  s.get("layer"), "call random layers with training=False at inference, or remove "
                  "them from the exported model")
        elif s.get("code") == "untracked_state" and all(u.get("layer") != s.get("layer")
                                                          or u.get("attribute") != s.get("attribute")
                                                          for u in untracked):
            untracked.append(s)
    recorded = {(u.get("layer"), u.get("attribute")): u
                for u in (m.get("model") or {}).get("untracked_arrays") or []}
    for u in o.untracked_arrays or []:
        r = recorded.get((u.get("layer"), u.get("attribute")))
        if r is not None and r.get("sha256") != u.get("sha256") and all(
                (x.get("layer"), x.get("attribute")) != (u.get("layer"), u.get("attribute"))
                for x in untracked):
            untracked.append({"layer": u.get("layer"), "attribute": u.get("attribute"),
                              "evidence": "other values than at save"})
    if untracked:
        names = ", ".join(f"{u.get('layer')}.{u.get('attribute')}" for u in untracked)
        c.add("nondeterministic_model",
              f"array state that is not a weight, so not saved, is made anew at every load: {names}",
              None, [dict(u) for u in untracked],
              f"make {names} a weight (self.add_weight(..., trainable=False) assigned in build()) so "
              "the file stores it, or draw it from a seed kept in get_config()",
              bonus=4, layers=sorted({str(u.get("layer")) for u in untracked}))
    rec_equal = (m.get("probe") or {}).get("repeat_bitwise_equal")
    if o.cross_process_equal is False and o.in_process_equal is not False and rec_equal is not False \
            and c.has("weights_not_restored"):
        # Weights that are not restored are initialised anew by every load: that is why a fresh
        # process differs, and not a second cause.
        c.annotate("weights_not_restored", "they are drawn anew at every load, so a fresh process "
                   "gives other outputs", fresh_process_differs=True)
        return
    if o.in_process_equal is False or o.cross_process_equal is False or rec_equal is False:
        where = []
        if o.in_process_equal is False:
            where.append("two runs in one process differ")
        if o.cross_process_equal is False:
            where.append("a fresh process differs from the first")
        if rec_equal is False:
            where.append("it was already nondeterministic at save")
        if c.has("nondeterministic_model"):  # explained by named state already
            c.annotate("nondeterministic_model", "; ".join(where), in_process=o.in_process_equal,
                       cross_process=o.cross_process_equal)
            return
        random = [f for f in c.items if f.code == "random_layers_active"]
        fix = ("call the random layer(s) " + ", ".join(str(f.current) for f in random)
               + " with training=False at inference" if random and o.in_process_equal is False else
               "enable op determinism (tf.config.experimental.enable_op_determinism()) at save and "
               "run, or compare within tolerance" if o.in_process_equal is not False else
               "a layer draws random numbers at inference (a random op in call() that ignores "
               "`training`): make it depend on training, seed it, or compare within tolerance")
        c.add("nondeterministic_model", "the model is not deterministic here: " + "; ".join(where),
              rec_equal, {"in_process": o.in_process_equal, "cross_process": o.cross_process_equal},
              fix, in_process=o.in_process_equal, cross_process=o.cross_process_equal)


def _shell(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    """Variables this shell sets otherwise than recorded: envlock used the recorded values, and
    says so, with both, because a plain `python` in this shell would not."""
    if o.shell_env is None:
        return
    renv = (m.get("determinism") or {}).get("env") or {}
    differ = {k: {"recorded": renv.get(k), "shell": v} for k, v in sorted(o.shell_env.items())
              if renv.get(k) != v}
    onednn = ((m.get("determinism") or {}).get("onednn") or {}).get("effective")
    shell_onednn = o.shell_env.get("TF_ENABLE_ONEDNN_OPTS")
    if onednn is not None and shell_onednn is not None \
            and (shell_onednn.strip().lower() in ("1", "true", "yes", "on")) != bool(onednn):
        differ.setdefault("TF_ENABLE_ONEDNN_OPTS", {"recorded": renv.get("TF_ENABLE_ONEDNN_OPTS"),
                                                    "shell": shell_onednn})
        differ["TF_ENABLE_ONEDNN_OPTS"]["recorded_effective"] = bool(onednn)
    if differ:
        c.notes.append({"what": "this shell sets recorded variables otherwise; envlock applied the "
                                "recorded values (a plain python here would not: --no-recorded-env "
                                "shows what they change)",
                        "variables": differ})


def diagnose(manifest: Mapping[str, Any], locked: Mapping[str, str], observed: Observed, *,
             mismatch: bool) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Findings ranked (1 = most likely cause of a mismatch), and notes that are not causes."""
    c = _Collector(mismatch)
    _model(manifest, observed, c)
    _custom(manifest, observed, c)
    _custom_modules(manifest, observed, c)
    _framework(manifest, observed, c)
    _packages(manifest, locked, observed, c)
    _python(manifest, observed, c)
    on_gpu = _hardware(manifest, observed, c)
    _determinism(manifest, observed, c, on_gpu)
    _randomness(manifest, observed, c)
    _shell(manifest, observed, c)
    return c.ranked(), c.notes
