"""What ``envlock save`` writes: the manifest, the lock files, the probe, the captured code and
REPRODUCE.md, handed to ``sidecar.write_sidecar`` all at once."""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import envlock
from envlock import templating
from envlock.commands.results import SaveResult
from envlock.facts.gpu import cuda_env_facts
from envlock.facts.modelfile import ModelInfo, sidecar_path
from envlock.locking import vendor
from envlock.locking.lockfiles import render_pylock, render_requirements
from envlock.settings import Settings
from envlock.sidecar.arrays import save_npz
from envlock.sidecar.store import MAIN_MODULE, write_sidecar
from envlock.sidecar.trust import trust
from envlock.worker.payload.framework import ENV_VARS

if TYPE_CHECKING:
    from envlock.commands.save import SaveOptions, _InMemory


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


def _vendor_code(custom: list[dict[str, Any]], code_dir: Path, mem: _InMemory | None,
                 files: dict[str, bytes | Path], warnings: list[str]) -> None:
    main_names = set(mem.main_objects) if mem is not None else set()
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
    if mem is not None and mem.main is not None:
        warnings.extend(mem.main.warnings)
        for rel in mem.main.helpers:
            files[f"code/{rel}"] = code_dir / rel
    for c in custom:  # machine-specific paths say nothing on another machine
        c["source_file"] = c.pop("file", None)
        c.pop("root", None)


def _module_records(module_facts: Sequence[Mapping[str, Any]], mem: _InMemory | None,
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
    if mem is not None and mem.main is not None:
        for module, rel in sorted(mem.main.helper_modules.items()):
            records.append({"module": module, "reason": f"imported by {MAIN_MODULE}",
                            "sha256": hashlib.sha256(mem.main.helpers[rel].read_bytes()).hexdigest(),
                            "in_site_packages": False, "distribution": None,
                            "vendored": f"code/{rel}"})
    return records


def _array_specs(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    save_npz(buf, arrays)
    return buf.getvalue()


def write_record(path: Path, info: ModelInfo, settings: Settings, options: SaveOptions, host: dict[str, Any],
           gpus: dict[str, Any], dists: list[dict[str, Any]], packages: list[Any],
           lock_texts: dict[str, bytes], loaded: dict[str, Any], specs: list[dict[str, Any]],
           fingerprint: dict[str, Any], mismatched: list[str], probe_in: Path,
           outputs: dict[str, np.ndarray], probe_source: str, repeatable: bool, facts: dict[str, Any],
           code_dir: Path, mem: _InMemory | None, seconds: dict[str, float], t0: float,
           command: str, *, vendored: vendor.VendorResult | None = None,
           varying: Sequence[str] = (),
           module_facts: Sequence[Mapping[str, Any]] = ()) -> SaveResult:
    warnings: list[str] = []
    files: dict[str, bytes | Path] = dict(lock_texts)
    custom = [dict(c) for c in loaded["custom_objects"]]
    _vendor_code(custom, code_dir, mem, files, warnings)
    custom_modules = _module_records(module_facts, mem, files)

    with np.load(probe_in, allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    probe_arrays = {f"input__{k}": v for k, v in inputs.items()}
    probe_arrays.update({f"output__{k}": v for k, v in outputs.items()})
    files["probe.npz"] = _npz_bytes(probe_arrays)

    conda = None
    if (Path(sys.prefix) / "conda-meta").is_dir():
        from envlock.locking import condalock  # only inside conda

        conda = condalock.capture(Path(sys.prefix), dists, packages)
        files[condalock.LOCKFILE] = conda.text.encode()
        warnings.extend(conda.warnings)
    # What conda installed is locked by conda-lock.yml, whatever its PEP 610 record says.
    by_conda = set(conda.manifest["conda_owned_distributions"]) if conda else set()
    python = host["python"]
    missing = tuple(p.name for p in packages if p.kind == "index" and not p.files and p.name not in by_conda)
    risks = tuple({"name": p.name, "version": p.version, "kind": p.kind,
                   "url": (p.direct_url or {}).get("url")} for p in packages
                  if p.kind != "index" and p.name not in by_conda)
    if missing:
        warnings.append(f"no sha256 from the index for {len(missing)} package(s): {', '.join(missing[:8])}"
                        + (" …" if len(missing) > 8 else "") + " (offline, or not on the index)")
    for r in risks:
        warnings.append(f"{r['name']} is an {r['kind']} install: not locked, a reproducibility risk")
    if not repeatable:
        named = [f["layer"] for f in loaded.get("static_findings", [])
                 if f.get("code") == "random_layers_active"]
        warnings.append("two runs of the probe in one process gave different bits for output(s) "
                        f"{', '.join(varying)}: the model is nondeterministic here"
                        + (f" (layer {', '.join(named)} is random at inference)" if named else "")
                        + "; `envlock run` will not promise their bits")
    if mismatched:
        warnings.append(f"weights_not_restored in layer(s) {', '.join(mismatched)} (saved anyway: "
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
    if os.environ.get("PYTHONPATH"):
        warnings.append("PYTHONPATH is set: modules found through it are not locked")

    if vendored is not None:
        files.update(vendor.sidecar_files(vendored))
        warnings.extend(vendored.warnings)
    framework = facts["framework"]
    determinism = facts["determinism"]
    tf_build = framework.get("tf_build") or {}
    model_json = info.to_json()
    for key, value in (loaded.get("file_metadata") or {}).items():
        if model_json.get(key) is None and value is not None:  # legacy HDF5: only h5py reads it
            model_json[key] = value
    model_json["inputs"] = specs
    jit = loaded.get("jit_compile") or {}
    model_json["jit_compile"] = jit.get("effective")
    model_json["stored_jit_compile"] = jit.get("stored")
    model_json["untracked_arrays"] = loaded.get("untracked_arrays") or []
    model_json["outputs"] = [{"name": k, "shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                             for k, v in outputs.items()]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest: dict[str, Any] = {
        "envlock_version": envlock.__version__,
        "created": created,
        "command": command,
        "model": model_json,
        "python": python,
        "platform": host["platform"],
        "gpu": gpus,
        "cuda": {
            "is_cuda_build": tf_build.get("is_cuda_build"),
            "cuda_version": tf_build.get("cuda_version"),
            "cudnn_version": tf_build.get("cudnn_version"),
            "tf_build": tf_build,
            **cuda_env_facts(os.environ, dists),
        },
        "framework": {k: v for k, v in framework.items() if k != "tf_build"},
        "determinism": determinism,
        "packages": {
            "count": len(packages),
            "hashed": sum(1 for p in packages if p.files),
            "complete": not missing and not risks,
            "missing_hashes": list(missing),
            "risks": list(risks),
            "index_urls": [u for u in settings.index_urls],
            "vendored": vendored.manifest() if vendored is not None else None,
        },
        "custom_objects": custom,
        "custom_object_modules": custom_modules,
        "weights": {**fingerprint, "restored": not mismatched, "mismatched_layers": mismatched},
        "probe": {
            "file": "probe.npz",
            "source": probe_source,
            "seed": options.seed if probe_source == "generated" else None,
            "batch_size": options.batch_size,
            "inputs": _array_specs(inputs),
            "outputs": _array_specs(outputs),
            "repeat_bitwise_equal": repeatable,
            "varying_outputs": list(varying),
            "tolerance": {"atol": options.atol, "rtol": options.rtol},
        },
        "static_findings": [*loaded.get("static_findings", []), *(loaded.get("untracked_lost") or [])],
        "warnings": warnings,
    }
    if conda is not None:
        manifest["conda"] = conda.manifest
    files["REPRODUCE.md"] = _reproduce(path, manifest).encode()
    sc = write_sidecar(path, manifest, files)
    trust(settings, sc, reason="saved on this machine")
    seconds["total"] = time.perf_counter() - t0
    return SaveResult(
        model=path, sidecar=sc.path, packages=len(packages), hashed=manifest["packages"]["hashed"],
        missing_hashes=missing, risks=risks, custom_objects=tuple(custom),
        weights_overall=fingerprint["overall"], weights_restored=not mismatched,
        mismatched_layers=tuple(mismatched), probe_inputs=tuple(manifest["probe"]["inputs"]),
        probe_repeatable=repeatable, warnings=tuple(warnings), seconds=seconds,
    )


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
