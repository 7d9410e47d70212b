"""Weight fingerprints: sha256 per variable and overall. numpy only, so host and worker agree.

A fingerprint covers exactly the state that determines predictions: the model's variables
(``model.weights``, which holds no optimizer state) and the vocabularies of lookup layers,
hashed by content (Keras 2 lists a lookup table in ``model.weights`` as a ``VocabWeightHandler``
object, not an array: hashing that object would hash a memory address).
"""

from __future__ import annotations

import hashlib

import numpy as np


def array_sha256(arr) -> str:
    """Hash of dtype, shape and content: two arrays hash alike only if they are bitwise equal.
    Arrays of strings (bytes, str or Python objects from a string tensor) hash element by
    element, length-prefixed, never by the pointers an object array holds."""
    a = np.asarray(arr)
    h = hashlib.sha256()
    if a.dtype.kind in "OSU":
        h.update(("strings|%s|" % ",".join(str(d) for d in a.shape)).encode())
        for item in a.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode("utf-8")
            h.update(b"%d:" % len(b))
            h.update(b)
        return h.hexdigest()
    a = np.ascontiguousarray(a)
    h.update(("%s|%s|" % (a.dtype.str, ",".join(str(d) for d in a.shape))).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def variable_path(v) -> str:
    # Keras 3 variables have .path ("dense/kernel"); tf.keras ones have .name ("dense/kernel:0").
    path = getattr(v, "path", None) or getattr(v, "name", "") or ""
    return path[:-2] if path.endswith(":0") else path


def layer_of(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else path


def _is_variable(v) -> bool:
    # Keras 2's TrackableWeightHandler (lookup tables) sits in model.weights with neither.
    return hasattr(v, "numpy") and hasattr(v, "shape")


def walk_layers(model, depth_first: bool = False):
    """The model and every layer in it, nested ones too, each once. Breadth-first in the
    model's order; ``depth_first``: the last child first, down to its leaves, then the one
    before it (the order decides which layer a message names first)."""
    seen: list = []
    pending = [model]
    while pending:
        layer = pending.pop() if depth_first else pending.pop(0)
        if any(layer is s for s in seen):
            continue
        seen.append(layer)
        for attr in ("layers", "_layers"):
            subs = getattr(layer, attr, None)
            if isinstance(subs, (list, tuple)):
                pending.extend(subs)
                break
    return seen


def _vocabularies(model) -> list:
    """(path, array) for every lookup layer (StringLookup, IntegerLookup, TextVectorization)."""
    out = []
    for layer in walk_layers(model):
        get = getattr(layer, "get_vocabulary", None)
        if get is None or layer is model:
            continue
        try:
            vocab = get()
        except Exception:  # not adapted, or a layer that only shares the name
            continue
        items = [t if isinstance(t, (bytes, str)) else str(t) for t in list(vocab)]
        out.append(("%s/vocabulary" % getattr(layer, "name", "lookup"), np.array(items, dtype=object)))
    return out


def _entry(path: str, value, kind: str) -> dict:
    arr = np.asarray(value)
    return {"path": path, "shape": [int(d) for d in arr.shape],
            "dtype": "string" if arr.dtype.kind in "OSU" else str(arr.dtype),
            "sha256": array_sha256(arr), "kind": kind}


def fingerprint_weights(weights, vocabularies=()) -> dict:
    """{"variables": [{"path", "shape", "dtype", "sha256", "kind"}...], "overall": sha256}:
    variables in model order, then vocabularies; anything in ``weights`` that is not a
    variable is left to ``vocabularies``."""
    entries = []
    for v in weights:
        if not _is_variable(v):
            continue
        entries.append(_entry(variable_path(v), v.numpy(), "variable"))
    for path, value in vocabularies:
        entries.append(_entry(path, value, "vocabulary"))
    overall = hashlib.sha256("\n".join(e["sha256"] for e in entries).encode()).hexdigest()
    return {"variables": entries, "overall": overall}


def fingerprint_model(model) -> dict:
    """The fingerprint of a model as held in memory (host, envlock.save) or loaded (worker)."""
    weights = getattr(model, "weights", None) or []
    return fingerprint_weights(list(weights), _vocabularies(model))


def compare_fingerprints(expected: dict, actual: dict) -> list:
    """Layers whose variables differ. Compared by position (names get other counters in a new
    session), and a different variable count counts as a difference of every layer involved."""
    exp = expected.get("variables", [])
    act = actual.get("variables", [])
    bad = []
    for i in range(max(len(exp), len(act))):
        e = exp[i] if i < len(exp) else None
        a = act[i] if i < len(act) else None
        if e is None or a is None or e["sha256"] != a["sha256"]:
            name = layer_of((a or e or {})["path"])
            if name not in bad:
                bad.append(name)
    return bad


def compare_with_stored(stored: list, actual: dict) -> list:
    """Layers whose loaded variables are not the arrays the file stores for them.

    ``stored`` is [{"group", "index", "sha256", "layer"}...] read from the file itself:
    ``group`` is the file's folder of one layer's own arrays and ``index`` their order in it
    (None where the format keeps no order: a SavedModel checkpoint). A loaded layer matches a
    group when its variables, in order, are that group's arrays, in order: a variable given
    another same-shaped array of the file (two swapped) does not pass. Vocabularies are not
    compared here: the file keeps them outside its weight arrays.
    """
    groups: dict = {}
    unordered = []
    for s in stored:
        if s.get("index") is None:
            unordered.append(s)
        else:
            groups.setdefault(s["group"], []).append(s)
    left: dict = {}
    for items in groups.values():
        key = tuple(x["sha256"] for x in sorted(items, key=lambda x: x["index"]))
        left.setdefault(key, []).append(items[0]["layer"])
    unordered_left: dict = {}
    for s in unordered:
        unordered_left[s["sha256"]] = unordered_left.get(s["sha256"], 0) + 1
    loaded: dict = {}
    for v in actual.get("variables", []):
        if v.get("kind", "variable") == "variable":
            loaded.setdefault(layer_of(v["path"]), []).append(v["sha256"])
    bad = []
    for layer, shas in loaded.items():
        key = tuple(shas)
        if left.get(key):
            left[key].pop()
            continue
        if all(unordered_left.get(s, 0) > 0 for s in shas):
            for s in shas:
                unordered_left[s] -= 1
            continue
        bad.append(layer)
    # Name the layers as the user named them (the loaded variables' paths); the file's own
    # group names only when every loaded layer found its arrays.
    if not bad:
        for names in left.values():
            bad.extend(n for n in names if n not in bad)
        for s in unordered:
            if unordered_left.get(s["sha256"], 0) > 0 and s["layer"] not in bad:
                bad.append(s["layer"])
    return bad
