"""What ``envlock save`` writes: the manifest, the lock files, the probe, the captured code and
REPRODUCE.md, handed to ``sidecar.write_sidecar`` all at once."""

from __future__ import annotations

import hashlib
import io
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import envlock
from envlock import templating
from envlock.commands.results import SaveResult
from envlock.facts.gpu import cuda_env_facts
from envlock.facts.modelfile import ModelInfo, sidecar_path
from envlock.locking import vendor
from envlock.locking.lockfiles import LockedPackage, render_pylock, render_requirements
from envlock.settings import Settings
from envlock.sidecar.arrays import save_npz
from envlock.sidecar.customcode import MainCapture
from envlock.sidecar.store import MAIN_MODULE, write_sidecar
from envlock.sidecar.trust import trust
from envlock.worker.payload.framework import ENV_VARS

if TYPE_CHECKING:
    from envlock.commands.save import SaveOptions
    from envlock.locking import condalock


def render_locks(packages: list[Any], python_version: str, command: str,
                  settings: Settings) -> dict[str, bytes]:
    return {
        "requirements.lock.txt": render_requirements(
            packages, python_version=python_version, command=command,
            index_urls=settings.index_urls).encode(),
        "pylock.toml": render_pylock(packages, python_version=python_version,
                                     created_by="envlock").encode(),
    }


def _vendor_file(file: str | None, root: str | None, files: dict[str, bytes | Path]) -> str | None:
    """Copy a module of the user's project (file under its sys.path root) into code/, with its
    packages' __init__.py files; returns its path in the sidecar."""
    if not file or not root:
        return None
    src, top = Path(file), Path(root)
    rel = src.relative_to(top)
    files[f"code/{rel.as_posix()}"] = src
    parent = src.parent
    while parent != top and top in parent.parents:
        init = parent / "__init__.py"
        if init.is_file():
            files[f"code/{init.relative_to(top).as_posix()}"] = init
        parent = parent.parent
    return f"code/{rel.as_posix()}"


def _vendor_code(custom: list[dict[str, Any]], code_dir: Path, main: MainCapture | None,
                 files: dict[str, bytes | Path], warnings: list[str]) -> None:
    main_names = set(main.objects) if main is not None else set()
    for c in custom:
        c["vendored"] = None
        if c["module"] in ("__main__", MAIN_MODULE) or c["qualname"] in main_names:
            c["defined_in_main"] = True
            c["vendored"] = f"code/{MAIN_MODULE}.py"
            files[c["vendored"]] = code_dir / f"{MAIN_MODULE}.py"
            warnings.append(f"{c['qualname']} is defined in the __main__ script; its source was "
                            "captured, but it should live in a module")
            continue
        c["defined_in_main"] = False
        if not c.get("importable"):
            warnings.append(f"custom object {c['module']}.{c['qualname']} could not be imported at save")
            continue
        if c.get("in_site_packages"):
            continue
        c["vendored"] = _vendor_file(c.get("file"), c.get("root"), files)
    if main is not None:
        warnings.extend(main.warnings)
        for rel in main.helpers:
            files[f"code/{rel}"] = code_dir / rel
    for c in custom:  # machine-specific paths say nothing on another machine
        c["source_file"] = c.pop("file", None)
        c.pop("root", None)


def _module_records(module_facts: Sequence[Mapping[str, Any]], main: MainCapture | None,
                    files: dict[str, bytes | Path]) -> list[dict[str, Any]]:
    """The modules imported before loading, recorded so that run and check import them too:
    those given with --custom-objects (say, one that registers classes), and the user's own
    modules that captured __main__ code imports. A module of the user's project is copied into
    code/; one of an installed package is named with its distribution (it is in the lock)."""
    records = []
    for f in module_facts:
        records.append({"module": f["module"], "reason": "--custom-objects", "sha256": f.get("sha256"),
                        "in_site_packages": f.get("in_site_packages"),
                        "distribution": f.get("distribution"),
                        "vendored": None if f.get("in_site_packages")
                        else _vendor_file(f.get("file"), f.get("root"), files)})
    if main is not None:
        for module, rel in sorted(main.helper_modules.items()):
            records.append({"module": module, "reason": f"imported by {MAIN_MODULE}",
                            "sha256": hashlib.sha256(main.helpers[rel].read_bytes()).hexdigest(),
                            "in_site_packages": False, "distribution": None,
                            "vendored": f"code/{rel}"})
    return records


def _array_specs(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    save_npz(buf, arrays)
    return buf.getvalue()


@dataclass(frozen=True)
class Captured:
    """What a save found, gathered by ``save._lock`` and written by :func:`write_record`."""

    info: ModelInfo  # the model file as read here
    host: dict[str, Any]  # {"python": python_facts(), "platform": platform_facts()}
    gpus: dict[str, Any]
    dists: list[dict[str, Any]]  # the installed distributions
    packages: list[LockedPackage]  # and what the index said of each
    lock_texts: dict[str, bytes]  # sidecar path → rendered lock file
    command: str  # the command the lock files name
    vendored: vendor.VendorResult | None
    loaded: dict[str, Any]  # the worker's `load` answer, with what the save found added
    specs: list[dict[str, Any]]  # the model's inputs
    fingerprint: dict[str, Any]  # of the reloaded model's weights
    mismatched: list[str]  # layers whose weights did not come back
    probe_in: Path  # the probe's inputs (.npz)
    probe_source: str  # "generated", or where the user's probe came from
    reference: dict[str, np.ndarray]  # the reference outputs
    repeatable: bool  # two runs in one process gave the same bits
    varying: Sequence[str]  # the outputs that differed between them
    facts: dict[str, Any]  # the worker's framework and determinism facts
    code_dir: Path  # where the __main__ script's captured code was written
    main: MainCapture | None
    module_facts: Sequence[Mapping[str, Any]]  # the modules imported before loading
    environ: Mapping[str, str]  # the environment the save ran in
    seconds: dict[str, float]  # timings so far; "total" is added once written
    t0: float  # perf_counter() when the save started


def write_record(path: Path, cap: Captured, settings: Settings, options: SaveOptions) -> SaveResult:
    """Write the sidecar of ``path`` from what the save captured, trust it, and say what was
    written."""
    warnings: list[str] = []
    files: dict[str, bytes | Path] = dict(cap.lock_texts)
    custom = [dict(c) for c in cap.loaded["custom_objects"]]
    _vendor_code(custom, cap.code_dir, cap.main, files, warnings)
    custom_modules = _module_records(cap.module_facts, cap.main, files)
    with np.load(cap.probe_in, allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    probe_arrays = {f"input__{k}": v for k, v in inputs.items()}
    probe_arrays.update({f"output__{k}": v for k, v in cap.reference.items()})
    files["probe.npz"] = _npz_bytes(probe_arrays)
    conda = _capture_conda(cap, files, warnings)
    # What conda installed is locked by conda-lock.yml, whatever its PEP 610 record says.
    by_conda = set(conda.manifest["conda_owned_distributions"]) if conda else set()
    missing, risks = _unlocked(cap.packages, by_conda)
    warnings.extend(_warnings(cap, missing, risks))
    if cap.vendored is not None:
        files.update(vendor.sidecar_files(cap.vendored))
        warnings.extend(cap.vendored.warnings)
    manifest: dict[str, Any] = {
        **_environment_sections(cap),
        "packages": _packages_section(cap, settings, missing, risks),
        "custom_objects": custom,
        "custom_object_modules": custom_modules,
        "weights": {**cap.fingerprint, "restored": not cap.mismatched,
                    "mismatched_layers": cap.mismatched},
        "probe": _probe_section(cap, options, inputs),
        "static_findings": [*cap.loaded.get("static_findings", []),
                            *(cap.loaded.get("untracked_lost") or [])],
        "warnings": warnings,
    }
    if conda is not None:
        manifest["conda"] = conda.manifest
    files["REPRODUCE.md"] = _reproduce(path, manifest).encode()
    sc = write_sidecar(path, manifest, files)
    trust(settings, sc, reason="saved on this machine")
    cap.seconds["total"] = time.perf_counter() - cap.t0
    return SaveResult(
        model=path, sidecar=sc.path, packages=len(cap.packages), hashed=manifest["packages"]["hashed"],
        missing_hashes=missing, risks=risks, custom_objects=tuple(custom),
        weights_overall=cap.fingerprint["overall"], weights_restored=not cap.mismatched,
        mismatched_layers=tuple(cap.mismatched), probe_inputs=tuple(manifest["probe"]["inputs"]),
        probe_repeatable=cap.repeatable, warnings=tuple(warnings), seconds=cap.seconds,
    )


def _capture_conda(cap: Captured, files: dict[str, bytes | Path], warnings: list[str]
                   ) -> condalock.CondaCapture | None:
    """conda-lock.yml, when this environment is a conda one."""
    if not (Path(sys.prefix) / "conda-meta").is_dir():
        return None
    from envlock.locking import condalock  # only inside conda

    conda = condalock.capture(Path(sys.prefix), cap.dists, cap.packages)
    files[condalock.LOCKFILE] = conda.text.encode()
    warnings.extend(conda.warnings)
    return conda


def _unlocked(packages: Sequence[LockedPackage], by_conda: set[str]
              ) -> tuple[tuple[str, ...], tuple[dict[str, Any], ...]]:
    """The index packages without a sha256, and the installs that are not locked at all."""
    missing = tuple(p.name for p in packages if p.kind == "index" and not p.files and p.name not in by_conda)
    risks = tuple({"name": p.name, "version": p.version, "kind": p.kind,
                   "url": (p.direct_url or {}).get("url")} for p in packages
                  if p.kind != "index" and p.name not in by_conda)
    return missing, risks


def _warnings(cap: Captured, missing: Sequence[str], risks: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the save says about the packages, the model's reload and the environment."""
    warnings = []
    if missing:
        warnings.append(f"no sha256 from the index for {len(missing)} package(s): {', '.join(missing[:8])}"
                        + (" …" if len(missing) > 8 else "") + " (offline, or not on the index)")
    for r in risks:
        warnings.append(f"{r['name']} is an {r['kind']} install: not locked, a reproducibility risk")
    loaded = cap.loaded
    if not cap.repeatable:
        named = [f["layer"] for f in loaded.get("static_findings", [])
                 if f.get("code") == "random_layers_active"]
        warnings.append("two runs of the probe in one process gave different bits for output(s) "
                        f"{', '.join(cap.varying)}: the model is nondeterministic here"
                        + (f" (layer {', '.join(named)} is random at inference)" if named else "")
                        + "; `envlock run` will not promise their bits")
    if cap.mismatched:
        warnings.append(f"weights_not_restored in layer(s) {', '.join(cap.mismatched)} (saved anyway: "
                        "--allow-mismatch)")
    if loaded.get("in_memory_warning"):
        warnings.append(loaded["in_memory_warning"])
    if loaded.get("settings_not_applied"):
        warnings.append("the reload worker could not take on the training process's "
                        + ", ".join(f"{k} ({v['training']!r}; it had {v['reload']!r})"
                                    for k, v in loaded["settings_not_applied"].items())
                        + ": the reference was predicted without them")
    for u in loaded.get("untracked_lost") or []:
        warnings.append(f"layer {u['layer']}: {u['evidence']} (it is made anew at every load: make "
                        "it a weight with add_weight(trainable=False), or draw it from a seed in "
                        "get_config())")
    if cap.environ.get("PYTHONPATH"):
        warnings.append("PYTHONPATH is set: modules found through it are not locked")
    return warnings


def _environment_sections(cap: Captured) -> dict[str, Any]:
    """The manifest's head: who wrote it, the model, and the machine and framework it ran on."""
    framework = cap.facts["framework"]
    tf_build = framework.get("tf_build") or {}
    return {
        "envlock_version": envlock.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": cap.command,
        "model": _model_section(cap),
        "python": cap.host["python"],
        "platform": cap.host["platform"],
        "gpu": cap.gpus,
        "cuda": {
            "is_cuda_build": tf_build.get("is_cuda_build"),
            "cuda_version": tf_build.get("cuda_version"),
            "cudnn_version": tf_build.get("cudnn_version"),
            "tf_build": tf_build,
            **cuda_env_facts(cap.environ, cap.dists),
        },
        "framework": {k: v for k, v in framework.items() if k != "tf_build"},
        "determinism": cap.facts["determinism"],
    }


def _model_section(cap: Captured) -> dict[str, Any]:
    loaded = cap.loaded
    model_json = cap.info.to_json()
    for key, value in (loaded.get("file_metadata") or {}).items():
        if model_json.get(key) is None and value is not None:  # legacy HDF5: only h5py reads it
            model_json[key] = value
    model_json["inputs"] = cap.specs
    jit = loaded.get("jit_compile") or {}
    model_json["jit_compile"] = jit.get("effective")
    model_json["stored_jit_compile"] = jit.get("stored")
    model_json["untracked_arrays"] = loaded.get("untracked_arrays") or []
    model_json["outputs"] = [{"name": k, "shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                             for k, v in cap.reference.items()]
    return model_json


def _packages_section(cap: Captured, settings: Settings, missing: Sequence[str],
                      risks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    packages = cap.packages
    return {
        "count": len(packages),
        "hashed": sum(1 for p in packages if p.files),
        "complete": not missing and not risks,
        "missing_hashes": list(missing),
        "risks": list(risks),
        "index_urls": [u for u in settings.index_urls],
        "vendored": cap.vendored.manifest() if cap.vendored is not None else None,
    }


def _probe_section(cap: Captured, options: SaveOptions, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        "file": "probe.npz",
        "source": cap.probe_source,
        "seed": options.seed if cap.probe_source == "generated" else None,
        "batch_size": options.batch_size,
        "inputs": _array_specs(inputs),
        "outputs": _array_specs(cap.reference),
        "repeat_bitwise_equal": cap.repeatable,
        "varying_outputs": list(cap.varying),
        "tolerance": {"atol": options.atol, "rtol": options.rtol},
    }


def _reproduce(path: Path, manifest: dict[str, Any]) -> str:
    python = dict(manifest["python"])
    python["minor"] = ".".join(str(python["version"]).split(".")[:2])
    model = dict(manifest["model"])
    model["stem"] = Path(model["file"]).stem.replace(".", "-") or "model"
    env = manifest["determinism"].get("env") or {}
    exports = [(k, shlex.quote(str(env[k]))) for k in ENV_VARS if env.get(k) is not None]
    libc = manifest["platform"].get("libc")
    platform = dict(manifest["platform"])
    platform["libc"] = " ".join(str(x) for x in libc.values() if x) if isinstance(libc, dict) else libc
    return templating.render(
        "REPRODUCE.md.j2",
        envlock_version=manifest["envlock_version"], created=manifest["created"],
        command=manifest["command"], model=model, python=python, platform=platform,
        framework=manifest["framework"], cuda=manifest["cuda"], gpus=manifest["gpu"].get("gpus") or [],
        packages=manifest["packages"], determinism=manifest["determinism"],
        custom_objects=manifest["custom_objects"], probe=manifest["probe"],
        sidecar_name=sidecar_path(path).name, env_exports=exports, conda="conda" in manifest,
    )
