"""Diagnosis rules about the model itself: its file (compared variable by variable with the
recorded fingerprint) and the code of its custom objects and of the modules imported before
loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envlock.diagnosis.findings import Collector, Observed


def _initial_value_hashes(var: Mapping[str, Any]) -> set[str]:
    """The hashes a variable of this shape and dtype has at its usual initial values (zeros for
    biases, betas and moving means; ones for gammas and moving variances)."""
    import numpy as np

    from envlock.worker.payload.fingerprint import array_sha256

    try:
        shape, dtype = tuple(int(d) for d in var["shape"]), np.dtype(var["dtype"])
    except (KeyError, TypeError, ValueError):
        return set()
    return {array_sha256(np.zeros(shape, dtype)), array_sha256(np.ones(shape, dtype))}


def _reset_to_initial(r: Mapping[str, Any], v: Mapping[str, Any]) -> bool:
    """``v`` differs from the recorded ``r`` by holding its initial value where ``r`` did not."""
    return r["sha256"] != v["sha256"] and v["sha256"] in _initial_value_hashes(v) \
        and r["sha256"] not in _initial_value_hashes(r)


def _layer_states(rec: Mapping[str, Mapping[str, Any]], cur: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Each layer's variables by state (unchanged, changed, new, gone), and the changed variables
    that now hold their initial value."""
    from envlock.worker.payload.fingerprint import layer_of

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
            if _reset_to_initial(r, v):
                initial.append(path)
    for path in rec:
        if path not in cur:
            mark(layer_of(path), "gone", path)
    return layers, initial


def _renamed(layers: Mapping[str, Mapping[str, list[str]]], rec: Mapping[str, Mapping[str, Any]],
             cur: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Gone layers paired with new ones whose variables have the same shapes, in order."""
    gone = [k for k, st in layers.items() if set(st) == {"gone"}]
    new = [k for k, st in layers.items() if set(st) == {"new"}]
    renamed: dict[str, str] = {}
    for g in gone:
        shapes = [rec[p]["shape"] for p in layers[g]["gone"]]
        for n in new:
            if n not in renamed.values() and [cur[p]["shape"] for p in layers[n]["new"]] == shapes:
                renamed[g] = n
                break
    return renamed


def _state(st: Mapping[str, list[str]]) -> str:
    if set(st) == {"unchanged"}:
        return "unchanged"
    if set(st) == {"new"}:
        return "new"
    if set(st) == {"gone"}:
        return "gone"
    return "changed"


def compare_variables(recorded: list[Mapping[str, Any]], current: list[Mapping[str, Any]]
                      ) -> dict[str, Any]:
    """The recorded and current variables matched by path, summed up per layer.

    A layer is unchanged, changed, new (only here) or gone (only at save); a gone and a new
    layer whose variables have the same shapes, in order, are one layer renamed. A variable
    that differs and now holds its initial value (all zeros or all ones where the recorded one
    did not) says the layer's weights were never loaded into it.
    """
    from envlock.worker.payload.fingerprint import layer_of

    rec = {str(v["path"]): v for v in recorded}
    cur = {str(v["path"]): v for v in current}
    layers, initial = _layer_states(rec, cur)
    renamed = _renamed(layers, rec, cur)
    same_weights = {g: all(rec[a]["sha256"] == cur[b]["sha256"]
                           for a, b in zip(layers[g]["gone"], layers[n]["new"]))
                    for g, n in renamed.items()}
    for g, n in renamed.items():
        if not same_weights[g]:
            initial += [b for a, b in zip(layers[g]["gone"], layers[n]["new"])
                        if _reset_to_initial(rec[a], cur[b])]
    by_state: dict[str, list[str]] = {"unchanged": [], "changed": [], "new": [], "gone": []}
    for layer, st in layers.items():
        by_state[_state(st)].append(layer)
    for g, n in renamed.items():
        by_state["gone"].remove(g)
        by_state["new"].remove(n)
        by_state["unchanged" if same_weights[g] else "changed"].append(n)
    return {**{k: sorted(v) for k, v in by_state.items()}, "renamed": renamed,
            "initial_values": sorted({layer_of(p) for p in initial}),
            "initial_variables": sorted(initial)}


def model_file(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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


def _changed_file(m: Mapping[str, Any], o: Observed, c: Collector, w: Mapping[str, Any]) -> None:
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


def custom_code(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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


def custom_modules(m: Mapping[str, Any], o: Observed, c: Collector) -> None:
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
