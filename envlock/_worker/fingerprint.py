"""Weight fingerprints: sha256 per variable and overall. numpy only, so host and worker agree."""

from __future__ import annotations

import hashlib

import numpy as np


def array_sha256(arr) -> str:  # type: ignore[no-untyped-def]
    """Hash of dtype, shape and bytes: two arrays hash alike only if they are bitwise equal."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(("%s|%s|" % (a.dtype.str, ",".join(str(d) for d in a.shape))).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def variable_path(v) -> str:  # type: ignore[no-untyped-def]
    # Keras 3 variables have .path ("dense/kernel"); tf.keras ones have .name ("dense/kernel:0").
    path = getattr(v, "path", None) or getattr(v, "name", "") or ""
    return path[:-2] if path.endswith(":0") else path


def layer_of(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else path


def fingerprint_weights(weights) -> dict:  # type: ignore[no-untyped-def]
    """{"variables": [{"path", "shape", "dtype", "sha256"}...], "overall": sha256}, in model order."""
    entries = []
    for v in weights:
        value = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        entries.append({
            "path": variable_path(v),
            "shape": [int(d) for d in np.shape(value)],
            "dtype": str(np.asarray(value).dtype),
            "sha256": array_sha256(value),
        })
    overall = hashlib.sha256("\n".join(e["sha256"] for e in entries).encode()).hexdigest()
    return {"variables": entries, "overall": overall}


def compare_fingerprints(expected: dict, actual: dict) -> list:  # type: ignore[type-arg]
    """Layers whose variables differ. Compared by position (names get other counters in a new
    session), and a different variable count counts as a difference of every layer involved."""
    exp = expected.get("variables", [])
    act = actual.get("variables", [])
    bad = []
    for i in range(max(len(exp), len(act))):
        e = exp[i] if i < len(exp) else None
        a = act[i] if i < len(act) else None
        if e is None or a is None or e["sha256"] != a["sha256"]:
            name = layer_of((a or e)["path"])  # type: ignore[index]
            if name not in bad:
                bad.append(name)
    return bad


def compare_with_stored(stored: list, actual: dict) -> list:  # type: ignore[type-arg]
    """Layers (as named in the file) whose stored arrays are not among the loaded variables.

    ``stored`` is [{"layer", "sha256"}...] read from the file itself. Matched as a multiset,
    because the file's layout (h5 groups, checkpoint keys) does not map 1:1 to variable paths.
    """
    stored_left: dict = {}
    for s in stored:
        stored_left[s["sha256"]] = stored_left.get(s["sha256"], 0) + 1
    unmatched_loaded = []
    for v in actual.get("variables", []):
        if stored_left.get(v["sha256"], 0) > 0:
            stored_left[v["sha256"]] -= 1
        else:
            unmatched_loaded.append(layer_of(v["path"]))
    # Name the layers as the user named them (the loaded variables' paths); the file's own
    # group names ("dense_1") only when every loaded variable found its array.
    bad = []
    for name in unmatched_loaded:
        if name not in bad:
            bad.append(name)
    if not bad:
        for s in stored:
            if stored_left.get(s["sha256"], 0) > 0 and s["layer"] not in bad:
                bad.append(s["layer"])
    return bad
