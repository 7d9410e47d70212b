"""Explain differences between a sidecar and a target environment (DESIGN section 4).

Pure: it takes the manifest and what was observed on the target, and returns findings.
Every difference that can change predictions is a finding with a stable cause code, the
evidence (recorded and current value) and a fix. Findings are ranked by how likely each is
to explain a mismatch: a changed weight fingerprint outranks a patch release of numpy.
Differences that cannot change predictions (a CLI tool's version) are not causes; they are
kept apart as ``notes``.
"""


from collections.abc import Mapping
from typing import Any

from envlock.diagnosis.findings import (
    NUMERIC_PACKAGES,
    PRIORS,
    Collector,
    Finding,
    Observed,
    changes_predictions,
    minor,
)
from envlock.diagnosis.model_rules import custom_code, custom_modules, model_file
from envlock.locking.reqfile import NOT_RUNTIME

__all__ = ["NUMERIC_PACKAGES", "PRIORS", "Finding", "Observed", "diagnose"]


_BACKEND_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch",), "tensorflow": ("tensorflow",),
                     "numpy": ("numpy",)}


def _framework(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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


def _packages(m: Mapping[str, Any], locked: Mapping[str, str], o: Observed, c: Collector) -> None:
    if o.packages is None or not locked:
        return
    changed: dict[str, tuple[str | None, str | None]] = {}
    for name in sorted(set(locked) | set(o.packages)):
        if name in NOT_RUNTIME:
            continue
        a, b = locked.get(name), o.packages.get(name)
        if a != b:
            changed[name] = (a, b)
    if not changed:
        return
    matter = {k: v for k, v in changed.items() if changes_predictions(k, o.custom_modules)}
    rest = {k: v for k, v in changed.items() if k not in matter}
    if matter:
        bonus = 0
        # A major or minor release of TensorFlow/Keras/numpy changes kernels; a patch rarely does.
        if any(a and b and minor(a) != minor(b) for a, b in matter.values()):
            bonus = 10
        names = ", ".join(f"{k} {a or '-'} → {b or '-'}" for k, (a, b) in matter.items())
        c.add("package_versions_differ", f"packages that change what the model computes differ: {names}",
              {k: a for k, (a, _) in matter.items()}, {k: b for k, (_, b) in matter.items()},
              "run in the locked environment (`envlock run`), or `uv pip sync "
              "MODEL.envlock/requirements.lock.txt`", bonus=bonus, packages=sorted(matter))
    if rest:
        c.notes.append({"what": "other packages differ (cannot change predictions)",
                        "packages": {k: {"recorded": a, "current": b} for k, (a, b) in rest.items()}})


def _python(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
    rec = (m.get("python") or {}).get("version")
    cur = (o.python or {}).get("version")
    if rec and cur and rec != cur:
        other_minor = minor(rec) != minor(cur)
        c.add("python_version_differs", f"Python {cur} instead of {rec}", rec, cur,
              f"run with Python {rec} (`uv python install {rec}`; envlock run finds it)",
              bonus=0 if other_minor else -20)


_XLA_KEYS = ("TF_XLA_FLAGS", "XLA_FLAGS", "TF_ENABLE_XLA")
_THREAD_KEYS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def _determinism(m: Mapping[str, Any], o: Observed, c: Collector, on_gpu: bool) -> None:
    rec = m.get("determinism") or {}
    cur = o.determinism
    if cur is None:
        return
    _numerics(rec, cur, c, on_gpu)
    _xla(m, o, c, rec, cur)
    _op_determinism(rec, cur, c)
    _threads(m, o, c, rec, cur)


def _numerics(rec: Mapping[str, Any], cur: Mapping[str, Any], c: Collector, on_gpu: bool) -> None:
    """oneDNN, TensorFloat-32 and the global dtype policy: what the kernels compute in."""
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


def _xla(m: Mapping[str, Any], o: Observed, c: Collector, rec: Mapping[str, Any],
         cur: Mapping[str, Any]) -> None:
    renv, cenv = rec.get("env") or {}, cur.get("env") or {}
    # The model's own jit_compile (stored in a .keras file by compile(jit_compile=True)) as the
    # predicting model had it: at save, and here.
    rjit, cjit = (m.get("model") or {}).get("jit_compile"), o.model_jit
    model_jit_differs = rjit is not None and cjit is not None and bool(rjit) != bool(cjit)
    if (rec.get("jit") or "") != (cur.get("jit") or "") or model_jit_differs \
            or any(renv.get(k) != cenv.get(k) for k in _XLA_KEYS):
        fix = "use the recorded XLA settings (unset TF_XLA_FLAGS / tf.config.optimizer.set_jit(False))"
        if model_jit_differs:
            fix = (f"predict with model.jit_compile = {bool(rjit)} as at save (the file as saved stored "
                   f"jit_compile={(m.get('model') or {}).get('stored_jit_compile')}; envlock run "
                   "honours what the file stores)")
        c.add("xla_differs", "XLA / auto-jit settings differ"
              + (f": the model predicted with jit_compile={bool(rjit)} at save and {bool(cjit)} here"
                 if model_jit_differs else ""),
              {"jit": rec.get("jit"), "model_jit_compile": rjit, **{k: renv.get(k) for k in _XLA_KEYS}},
              {"jit": cur.get("jit"), "model_jit_compile": cjit, **{k: cenv.get(k) for k in _XLA_KEYS}},
              fix, bonus=20 if model_jit_differs else 0)
    if o.jit_not_honoured is not None:
        c.notes.append({"what": f"the file stores jit_compile={o.jit_not_honoured}, which could not be "
                                "applied to the loaded model here: it predicted without it"})


def _op_determinism(rec: Mapping[str, Any], cur: Mapping[str, Any], c: Collector) -> None:
    renv, cenv = rec.get("env") or {}, cur.get("env") or {}
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


def _threads(m: Mapping[str, Any], o: Observed, c: Collector, rec: Mapping[str, Any],
             cur: Mapping[str, Any]) -> None:
    renv, cenv = rec.get("env") or {}, cur.get("env") or {}
    # Thread pools exist only where TensorFlow runs the model: a model saved (or run) with
    # another backend has no TensorFlow thread settings to compare.
    tf_both = (m.get("framework") or {}).get("backend", "tensorflow") == "tensorflow" \
        and (o.framework or {}).get("backend", "tensorflow") == "tensorflow" \
        and rec.get("intra_op_threads") is not None and cur.get("intra_op_threads") is not None
    rt = (rec.get("intra_op_threads"), rec.get("inter_op_threads"), rec.get("cpu_count"))
    ct = (cur.get("intra_op_threads"), cur.get("inter_op_threads"), cur.get("cpu_count"))
    env_differs = any(renv.get(k) != cenv.get(k) for k in _THREAD_KEYS)
    if tf_both and (rt[:2] != ct[:2] or (rt[:2] == (0, 0) and rt[2] != ct[2]) or env_differs):
        shown = [k for k in _THREAD_KEYS if renv.get(k) or cenv.get(k)]
        c.add("threads_differ", "thread settings (or the core count TensorFlow sizes its pools by) differ",
              {"intra": rt[0], "inter": rt[1], "cpus": rt[2], **{k: renv.get(k) for k in shown}},
              {"intra": ct[0], "inter": ct[1], "cpus": ct[2], **{k: cenv.get(k) for k in shown}},
              "use the recorded thread settings ("
              + ", ".join(f"{k}={renv.get(k)}" for k in _THREAD_KEYS if renv.get(k))
              + ("; " if any(renv.get(k) for k in _THREAD_KEYS) else "")
              + "tf.config.threading.set_intra_op/inter_op_parallelism_threads at save and run): "
              "reductions split work by thread count")


def _hardware(m: Mapping[str, Any], o: Observed, c: Collector) -> bool:
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


def _randomness(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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


def _shell(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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
    c = Collector(mismatch)
    model_file(manifest, observed, c)
    custom_code(manifest, observed, c)
    custom_modules(manifest, observed, c)
    _framework(manifest, observed, c)
    _packages(manifest, locked, observed, c)
    _python(manifest, observed, c)
    on_gpu = _hardware(manifest, observed, c)
    _determinism(manifest, observed, c, on_gpu)
    _randomness(manifest, observed, c)
    _shell(manifest, observed, c)
    return c.ranked(), c.notes
