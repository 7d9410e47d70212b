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
    fingerprint: Mapping[str, Any] | None = None
    load_error: Mapping[str, Any] | None = None
    static_findings: list[Mapping[str, Any]] = field(default_factory=list)
    in_process_equal: bool | None = None
    cross_process_equal: bool | None = None
    custom_modules: frozenset[str] = frozenset()


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


def _model(m: Mapping[str, Any], o: Observed, c: _Collector) -> None:
    rec = m["model"]["sha256"]
    if o.model_sha256 is not None and o.model_sha256 != rec:
        c.add("model_file_changed", f"{m['model']['file']} was modified after it was saved", rec,
              o.model_sha256, "restore the original file, or save the model again with `envlock save`")
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
    if rec.get("backend") and cur.get("backend") and rec["backend"] != cur["backend"]:
        c.add("backend_differs", "another Keras backend", rec["backend"], cur["backend"],
              f"set KERAS_BACKEND={rec['backend']}")


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
    if (rec.get("jit") or "") != (cur.get("jit") or "") or any(renv.get(k) != cenv.get(k) for k in xla_keys):
        c.add("xla_differs", "XLA / auto-jit settings differ",
              {"jit": rec.get("jit"), **{k: renv.get(k) for k in xla_keys}},
              {"jit": cur.get("jit"), **{k: cenv.get(k) for k in xla_keys}},
              "use the recorded XLA settings (unset TF_XLA_FLAGS / tf.config.optimizer.set_jit(False))")
    rec_ops = renv.get("TF_DETERMINISTIC_OPS")
    if (rec.get("op_determinism") and not cur.get("op_determinism")) or \
            (rec_ops and rec_ops != cenv.get("TF_DETERMINISTIC_OPS")):
        c.add("op_determinism_off", "op determinism was on at save and is off here",
              rec.get("op_determinism"), cur.get("op_determinism"),
              "tf.config.experimental.enable_op_determinism() (envlock run applies it)")
    rt = (rec.get("intra_op_threads"), rec.get("inter_op_threads"), rec.get("cpu_count"))
    ct = (cur.get("intra_op_threads"), cur.get("inter_op_threads"), cur.get("cpu_count"))
    if rt[:2] != ct[:2] or (rt[:2] == (0, 0) and rt[2] != ct[2]):
        c.add("threads_differ", "thread settings (or the core count TensorFlow sizes its pools by) differ",
              {"intra": rt[0], "inter": rt[1], "cpus": rt[2]},
              {"intra": ct[0], "inter": ct[1], "cpus": ct[2]},
              "pin intra/inter-op threads at save and run (tf.config.threading) for reductions that "
              "split work by thread count")


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
    for s in [*(m.get("static_findings") or []), *o.static_findings]:
        if s.get("code") == "random_layers_active":
            c.add("random_layers_active",
                  f"layer {s.get('layer')} is random at inference: {s.get('evidence')}", None,
                  s.get("layer"), "call random layers with training=False at inference, or remove "
                  "them from the exported model")
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
        c.add("nondeterministic_model", "the model is not deterministic here: " + "; ".join(where),
              rec_equal, {"in_process": o.in_process_equal, "cross_process": o.cross_process_equal},
              "enable op determinism, seed the random layers, or compare within tolerance",
              in_process=o.in_process_equal, cross_process=o.cross_process_equal)


def diagnose(manifest: Mapping[str, Any], locked: Mapping[str, str], observed: Observed, *,
             mismatch: bool) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Findings ranked (1 = most likely cause of a mismatch), and notes that are not causes."""
    c = _Collector(mismatch)
    _model(manifest, observed, c)
    _custom(manifest, observed, c)
    _framework(manifest, observed, c)
    _packages(manifest, locked, observed, c)
    _python(manifest, observed, c)
    on_gpu = _hardware(manifest, observed, c)
    _determinism(manifest, observed, c, on_gpu)
    _randomness(manifest, observed, c)
    return c.ranked(), c.notes
