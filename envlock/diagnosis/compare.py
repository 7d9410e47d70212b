"""Compare outputs with the reference: bitwise identical, within tolerance, or mismatch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when used: `envlock env` loads this module but never compares
    import numpy as np

IDENTICAL = "identical"
WITHIN_TOLERANCE = "within_tolerance"
MISMATCH = "mismatch"
_ORDER = {IDENTICAL: 0, WITHIN_TOLERANCE: 1, MISMATCH: 2}


@dataclass(frozen=True)
class OutputComparison:
    name: str
    status: str
    max_abs_diff: float
    max_rel_diff: float
    share_out_of_tolerance: float
    worst_index: tuple[int, ...] | None
    reference_shape: tuple[int, ...]
    actual_shape: tuple[int, ...] | None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no Infinity or NaN (strict parsers refuse them): a difference that cannot be
        # measured (a missing output, other shapes) is null, and the note says why.
        for key in ("max_abs_diff", "max_rel_diff"):
            if not math.isfinite(d[key]):
                d[key] = None
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        d["reference_shape"] = list(self.reference_shape)
        d["actual_shape"] = list(self.actual_shape) if self.actual_shape is not None else None
        return d


def compare_output(name: str, ref: np.ndarray, got: np.ndarray | None, *, atol: float,
                   rtol: float) -> OutputComparison:
    import numpy as np

    if got is None:
        return OutputComparison(name, MISMATCH, float("inf"), float("inf"), 1.0, None,
                                tuple(ref.shape), None, "output missing")
    if ref.shape != got.shape:
        return OutputComparison(name, MISMATCH, float("inf"), float("inf"), 1.0, None,
                                tuple(ref.shape), tuple(got.shape), "shapes differ")
    if ref.dtype == got.dtype and np.array_equal(ref, got, equal_nan=ref.dtype.kind in "fc"):
        return OutputComparison(name, IDENTICAL, 0.0, 0.0, 0.0, None, tuple(ref.shape), tuple(got.shape))
    if ref.dtype.kind not in "fciub" or got.dtype.kind not in "fciub":
        return OutputComparison(name, MISMATCH, float("inf"), float("inf"), 1.0, None,
                                tuple(ref.shape), tuple(got.shape), "non-numeric outputs differ")
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(r - g)
        both_nan = np.isnan(r) & np.isnan(g)
        diff = np.where(both_nan, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        rel = np.where(np.abs(r) > 0, diff / np.abs(r), np.where(diff > 0, np.inf, 0.0))
        out = diff > atol + rtol * np.abs(r)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else None
    share = float(out.mean()) if out.size else 0.0
    status = WITHIN_TOLERANCE if not out.any() else MISMATCH
    return OutputComparison(
        name, status, float(diff.max()) if diff.size else 0.0, float(rel.max()) if rel.size else 0.0,
        share, tuple(int(i) for i in worst) if worst is not None else None, tuple(ref.shape),
        tuple(got.shape),
    )


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], *,
                    atol: float, rtol: float) -> list[OutputComparison]:
    """Outputs matched by name; where names differ but the counts agree (an output layer renamed
    in a rebuilt model), the unmatched ones are paired in order and compared all the same."""
    missing = [k for k in reference if k not in actual]
    extra = [k for k in actual if k not in reference]
    renamed = dict(zip(missing, extra)) if len(missing) == len(extra) else {}
    out = []
    for name, ref in reference.items():
        if name in renamed:
            c = compare_output(name, ref, actual[renamed[name]], atol=atol, rtol=rtol)
            note = f"renamed: this model calls it {renamed[name]!r}"
            out.append(replace(c, note=f"{note}; {c.note}" if c.note else note))
        elif name in actual:
            out.append(compare_output(name, ref, actual[name], atol=atol, rtol=rtol))
        else:
            c = compare_output(name, ref, None, atol=atol, rtol=rtol)
            here = ", ".join(repr(k) for k in actual) or "none"
            out.append(replace(c, note=f"output missing (this model's outputs: {here})"))
    return out


def overall_status(comparisons: list[OutputComparison]) -> str:
    if not comparisons:
        return IDENTICAL
    return max((c.status for c in comparisons), key=_ORDER.__getitem__)
