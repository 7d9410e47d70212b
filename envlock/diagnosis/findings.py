"""What a diagnosis is made of (DESIGN section 4): the cause codes and their priors, a
finding, what was observed on the target, and the collector that ranks findings. The rules are
in diagnose.py (the environment) and model_rules.py (the model file and its code)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
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



def changes_predictions(package: str, custom_packages: Collection[str]) -> bool:
    """Whether another version of ``package`` can change what the model computes."""
    return package in NUMERIC_PACKAGES or package.startswith("nvidia-") or package in custom_packages


def custom_object_packages(custom_objects: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The distributions the custom objects' code likely comes from: the top-level module
    names as distribution names (``my_layers.blocks`` -> ``my-layers``)."""
    return frozenset(str(c.get("module", "")).split(".")[0].replace("_", "-") for c in custom_objects)


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


def minor(v: Any) -> str:
    return ".".join(str(v).split(".")[:2])


class Collector:
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
