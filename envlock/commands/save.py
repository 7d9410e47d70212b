"""`envlock save` / `envlock.lock`: capture the environment and reference predictions.

Order matters for speed: the package-index look-ups (network) and GPU facts run on threads
while the worker imports the framework, loads the file back, fingerprints and probes it.
The sidecar is written last, all at once (see sidecar.write_sidecar).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envlock.commands.reloader import (  # noqa: F401  (prewarm: envlock.commands.save.prewarm is public)
    CALLER_SETTINGS,
    RELOADER,
    caller_facts,
    caller_threads,
    prewarm,
    reload_key,
    save_sys_path,
    start_worker,
)
from envlock.commands.results import SaveResult
from envlock.commands.saverecord import render_locks, write_record
from envlock.errors import InputArrayError, MismatchError, WeightsNotRestoredError
from envlock.facts.gpu import gpu_facts
from envlock.facts.host import platform_facts, python_facts
from envlock.facts.modelfile import (
    check_archive_directory,
    check_model_path,
    inspect_model,
    sidecar_path,
)
from envlock.fs import log_dir, preflight_save
from envlock.index.client import in_background
from envlock.index.lookup import IndexClient
from envlock.locking import vendor
from envlock.locking.lockfiles import build_lock
from envlock.settings import Settings
from envlock.sidecar import customcode
from envlock.sidecar.arrays import save_npz
from envlock.sidecar.store import MAIN_MODULE
from envlock.worker.client import WorkerClient
from envlock.worker.payload.fingerprint import compare_fingerprints, compare_with_stored, fingerprint_model
from envlock.worker.payload.inventory import installed

DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5
Stage = Callable[[str], None]


@dataclass(frozen=True)
class SaveOptions:
    probe: Path | None = None
    probe_label: str | None = None  # how to name the probe's source when it is a temp file
    custom_object_modules: tuple[str, ...] = ()
    allow_mismatch: bool = False
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    seed: int = 0
    probe_rows: int = 16
    batch_size: int = 32
    command: str = ""
    extra_sys_path: tuple[str, ...] = ()
    vendor: bool = False  # copy every locked file into the sidecar's wheels/ (see vendoring)


@dataclass
class _InMemory:
    """What the API path knows that the file alone does not: the model as it was in memory."""

    worker: WorkerClient
    prepare_ticket: tuple[int, str] | None  # None: a reused worker, prepared already
    fingerprint: dict[str, Any]
    main: customcode.MainCapture | None = None  # the __main__ script's objects, captured
    # Modules defining objects the file names only by registered name (known in this process).
    registered_modules: tuple[str, ...] = ()
    model: Any = None
    # The calling (training) process's own settings, read where they were set (see caller_facts).
    determinism: dict[str, Any] = field(default_factory=dict)
    untracked: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main_objects(self) -> dict[str, str]:
        return self.main.objects if self.main is not None else {}



def _read_probe_file(path: Path, specs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    names = [s["name"] for s in specs]
    if not path.is_file():
        raise InputArrayError(f"{path}: no such probe file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
            if len(names) == 1 and len(data) == 1:
                data = {names[0]: next(iter(data.values()))}
        else:
            data = {names[0]: np.load(path, allow_pickle=False)}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InputArrayError(f"{path}: not a readable .npy/.npz probe ({exc})") from exc
    missing = [n for n in names if n not in data]
    if missing:
        raise InputArrayError(f"{path}: no array for input(s) {', '.join(missing)}")
    return {n: data[n] for n in names}


def _probe_specs(path: Path) -> list[dict[str, Any]] | None:
    """Input specs as a probe file gives them (names, one row's shape, dtype); None when the
    file is unreadable, which _read_probe_file reports once the model's own specs are known."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: (npz[k].shape, npz[k].dtype) for k in npz.files}
        else:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            arrays = {"input": (a.shape, a.dtype)}
    except (ValueError, OSError, zipfile.BadZipFile):
        return None
    if list(arrays) == ["__single__"]:
        arrays = {"input": arrays["__single__"]}
    return [{"name": k, "shape": [None, *[int(d) for d in shape[1:]]],
             "dtype": "string" if dtype.kind in "SU" else str(dtype)} for k, (shape, dtype) in arrays.items()]


def save(model: Any, path: str | os.PathLike[str], *, probe: Any = None, settings: Settings | None = None,
         custom_objects: Sequence[str] = (), allow_mismatch: bool = False, atol: float = DEFAULT_ATOL,
         rtol: float = DEFAULT_RTOL, on_stage: Stage | None = None, vendor: bool = False,
         **save_kwargs: Any) -> SaveResult:
    """Save ``model`` with Keras, then write its sidecar. ``probe``: array, dict or .npy/.npz path.
    ``vendor``: copy every locked wheel into the sidecar, so a rebuild needs no index."""
    path = Path(path)
    settings = settings or Settings.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="envlock-save-"))
    sys_path = save_sys_path()
    threads = caller_threads()
    key = reload_key(sys_path, custom_objects, threads)
    logs = log_dir(settings)
    try:
        client, ticket = RELOADER.acquire(
            key, lambda: start_worker(logs, sys_path, custom_objects, threads))
        keep = False
        try:
            model.save(os.fspath(path), **save_kwargs)
            config = customcode.read_config(path)
            mains = customcode.main_objects(model, config)
            mem = _InMemory(client, ticket, fingerprint_model(model),
                            registered_modules=tuple(customcode.registered_modules(config)),
                            model=model)
            mem.determinism, mem.untracked = caller_facts(model)
            if mains:
                mem.main = customcode.capture_main(mains)
            probe_path = None
            label = None
            in_memory = probe is not None and not isinstance(probe, (str, os.PathLike))
            if in_memory:
                label = "arrays passed to envlock.save"
                probe_path = workdir / "user-probe.npz"
                arrays = probe if isinstance(probe, Mapping) else {"__single__": probe}
                save_npz(probe_path, arrays)
            elif probe is not None:
                probe_path = Path(probe)
            options = SaveOptions(probe=probe_path, probe_label=label,
                                  custom_object_modules=tuple(custom_objects),
                                  allow_mismatch=allow_mismatch, atol=atol, rtol=rtol, vendor=vendor,
                                  command=f"envlock.save(model, {os.fspath(path)!r})")
            result = _lock(path, settings, options, workdir, mem, on_stage)
            keep = not mains
            return result
        finally:
            RELOADER.release(key, client, keep=keep)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def lock(path: str | os.PathLike[str], *, settings: Settings | None = None,
         options: SaveOptions | None = None, on_stage: Stage | None = None) -> SaveResult:
    """Write the sidecar for a model file that already exists."""
    workdir = Path(tempfile.mkdtemp(prefix="envlock-save-"))
    try:
        return _lock(Path(path), settings or Settings.from_env(), options or SaveOptions(), workdir,
                     None, on_stage)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _lock(path: Path, settings: Settings, options: SaveOptions, workdir: Path, mem: _InMemory | None,
          on_stage: Stage | None) -> SaveResult:
    stage = on_stage or (lambda s: None)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    # Missing, a link loop, a zip bomb: said now, before anything starts; the rest of
    # inspect_model's checks (a full read) run while the worker starts.
    check_model_path(path)
    if path.is_file():
        check_archive_directory(path)
    if options.probe is not None and not options.probe.is_file():
        raise InputArrayError(f"{options.probe}: no such probe file")
    preflight_save(path, options.probe)  # found now, not after the whole save has run
    dists = installed()
    pins = sorted({(d["name"], d["version"]) for d in dists if d["kind"] == "index"
                   and d["name"] != "envlock"})
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="envlock-save") as pool:
        # Checking the archive and hashing it read the whole file: for a big model that is
        # seconds, spent while the worker imports the framework instead of before.
        info_f = pool.submit(inspect_model, path)
        # Not on the pool: its threads are joined on the way out, and a Ctrl-C must not wait
        # for pages in flight (up to ENVLOCK_HTTP_TIMEOUT).
        lookups_f = in_background(IndexClient(settings).lookup_many, pins)
        gpu_f = pool.submit(gpu_facts)
        host = {"python": python_facts(), "platform": platform_facts()}
        code_dir = workdir / "code"
        sys_path = [os.getcwd(), *options.extra_sys_path]
        ticket: tuple[int, str] | None
        if mem is None:
            stage("starting the worker")
            logs = log_dir(settings)
            client, ticket = start_worker(logs, sys_path, options.custom_object_modules)
        else:
            client, ticket = mem.worker, mem.prepare_ticket
        try:
            info = info_f.result()  # a bad model file: exit 2 before it is loaded
            prepared = client.wait(ticket) if ticket is not None else {}
            seconds["framework_import"] = prepared.get("import_seconds", 0.0)
            module_facts = list(prepared.get("module_facts") or [])
            if options.custom_object_modules and not module_facts:  # a reused worker
                module_facts = client.request("prepare", {"modules": list(options.custom_object_modules)}
                                              ).get("module_facts") or []
            custom_map: dict[str, tuple[str, str]] = {}
            if mem is not None and mem.registered_modules:
                client.request("prepare", {"modules": list(mem.registered_modules),
                                           "modules_optional": True})
            if mem is not None and mem.main is not None:
                code_dir.mkdir(parents=True, exist_ok=True)
                (code_dir / f"{MAIN_MODULE}.py").write_text(mem.main.source, encoding="utf-8")
                for rel, src in mem.main.helpers.items():
                    (code_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, code_dir / rel)
                # The captured code, not the user's folder, must be what imports: the helpers
                # come from code/ too, as they will at run.
                client.request("prepare", {"sys_path": [str(code_dir)], "modules": [MAIN_MODULE]})
                custom_map = {name: (MAIN_MODULE, q) for name, q in mem.main_objects.items()}
            stage("loading the model back in a fresh process")
            # A subclassed model's file does not say its inputs: the probe does.
            probe_specs = _probe_specs(options.probe) if options.probe is not None else None
            load_args: dict[str, Any] = {"path": str(path.resolve()), "safe_mode": True,
                                         "custom_objects": custom_map, "import_config_modules": True,
                                         "inputs": probe_specs}
            if mem is not None:
                load_args["caller_settings"] = {k: mem.determinism.get(k) for k in CALLER_SETTINGS}
            loaded = client.request("load", load_args)
            specs = loaded["inputs"]
            probe_in = workdir / "probe-in.npz"
            if options.probe is not None:
                save_npz(probe_in, _read_probe_file(options.probe, specs))
                probe_source = options.probe_label or str(options.probe)
            else:
                probe_source = "generated"
            # Queue everything the worker has to do, then lock packages on this side while it
            # works: the two halves take about as long, and neither needs the other.
            stage("fingerprinting and running the probe")
            t_fp = client.send("fingerprint")
            t_stored = client.send("stored_weights") if mem is None else None
            t_make = None if options.probe is not None else client.send(
                "make_probe", {"path": str(probe_in), "seed": options.seed, "rows": options.probe_rows})
            out_paths = [workdir / f"probe-out-{i}.npz" for i in range(2)]
            t_preds = [client.send("predict", {"input": str(probe_in), "output": str(out),
                                               "batch_size": options.batch_size, "format": "npz"})
                       for out in out_paths]
            t_facts = client.send("facts")

            tl = time.perf_counter()
            lookups = lookups_f.result()
            seconds["index_wait"] = time.perf_counter() - tl
            packages = build_lock(dists, lookups)
            command = options.command or "envlock save " + shlex.quote(path.name)
            lock_texts = render_locks(packages, host["python"]["version"], command, settings)
            vendored = None
            if options.vendor:
                stage("vendoring wheels")
                vendored = vendor.vendor(packages, dists, settings,
                                            reuse=[sidecar_path(path) / vendor.WHEELS_DIR])

            fingerprint = client.wait(t_fp)
            if mem is not None:
                mismatched = compare_fingerprints(mem.fingerprint, fingerprint)
                against = "the model in memory"
            else:
                assert t_stored is not None
                mismatched = compare_with_stored(client.wait(t_stored), fingerprint)
                against = "the weights stored in the file"
            if mismatched and not options.allow_mismatch:
                custom_layers = [c["qualname"] for c in loaded["custom_objects"] if c.get("kind") == "class"]
                raise WeightsNotRestoredError(mismatched, detail=f"compared with {against}",
                                              custom_layers=custom_layers)
            if t_make is not None:
                client.wait(t_make)
            outs = []
            for ticket_, out in zip(t_preds, out_paths):
                meta = client.wait(ticket_)
                with np.load(out, allow_pickle=False) as npz:
                    outs.append({m["name"]: npz[m["name"]] for m in meta["outputs"]})
            facts = client.wait(t_facts)
            if any(not np.array_equal(outs[0][k], outs[1][k], equal_nan=True) for k in outs[0]):
                # Name the layer that draws random numbers at inference.
                layer = client.request("random_layer", {"input": str(probe_in)}).get("layer")
                if layer:
                    loaded = {**loaded, "static_findings": [
                        *loaded.get("static_findings", []),
                        {"code": "random_layers_active", "layer": layer,
                         "evidence": "its output differs between two calls on the same input in "
                                     "inference mode (a random op that ignores `training`)"}]}
            # Array state outside the variables: compared with the model in memory, or (from a
            # file alone) with a second load, which draws it anew if it is random.
            held = loaded.get("untracked_arrays") or []
            if mem is not None:
                untracked_lost = _untracked_lost(held, mem.untracked, "the model in memory")
            elif held:
                again = client.request("load", load_args).get("untracked_arrays")
                untracked_lost = _untracked_lost(held, again, "a second load")
            else:
                untracked_lost = []
        finally:
            if mem is None:
                client.close()
        # Outputs that two runs in one process gave other bits for: sampled at inference.
        varying = [k for k in outs[0] if not np.array_equal(outs[0][k], outs[1][k], equal_nan=True)]
        repeatable = not varying
        reference, in_memory_warning = outs[0], None
        if mem is not None and mem.model is not None:
            reference, in_memory_warning = _against_in_memory(mem.model, probe_in, outs[0], repeatable,
                                                              options, path)
        if in_memory_warning:
            loaded = {**loaded, "in_memory_warning": in_memory_warning}
        loaded = {**loaded, "untracked_lost": untracked_lost}
        gpus = gpu_f.result()

    if mem is not None and mem.determinism:
        # What the reload worker ran with, against the training process: the reference was
        # computed with the worker's, so any that it could not take on is said.
        worker = facts["determinism"]
        loaded = {**loaded, "settings_not_applied": {
            k: {"training": v, "reload": worker.get(k)} for k, v in mem.determinism.items()
            if k in worker and v is not None and worker.get(k) is not None and worker.get(k) != v}}
        facts = {**facts, "determinism": {**facts["determinism"], **mem.determinism}}
    return write_record(path, info, settings, options, host, gpus, dists, packages, lock_texts, loaded,
                  specs, fingerprint, mismatched, probe_in, reference, probe_source, repeatable, facts,
                  code_dir, mem, seconds, t0, command, vendored=vendored, varying=varying,
                  module_facts=module_facts)


def _untracked_lost(loaded: list[dict[str, Any]], other: list[dict[str, Any]] | None,
                    against: str) -> list[dict[str, Any]]:
    """Layer attributes holding arrays whose values differ between the reloaded model and
    ``other`` (the model in memory, or a second load): state the file does not keep."""
    by_key = {(u["layer"], u["attribute"]): u for u in other or []}
    lost = []
    for u in loaded:
        o = by_key.get((u["layer"], u["attribute"]))
        if o is not None and o["sha256"] != u["sha256"]:
            lost.append({"code": "untracked_state", "layer": u["layer"], "attribute": u["attribute"],
                         "evidence": f"{u['class']}.{u['attribute']} is a numpy array, not a weight: "
                                     f"the reloaded model holds other values than {against}"})
    return lost


def _predict_in_memory(model: Any, probe_in: Path, names: Sequence[str], batch_size: int
                       ) -> dict[str, np.ndarray]:
    with np.load(probe_in, allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    x: Any = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    y = model.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(y, Mapping):
        return {k: np.asarray(v) for k, v in y.items()}
    ys = list(y) if isinstance(y, (list, tuple)) else [y]
    return {n: np.asarray(v) for n, v in zip(names, ys)}


def _against_in_memory(model: Any, probe_in: Path, reloaded: dict[str, np.ndarray], repeatable: bool,
                       options: SaveOptions, path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """The probe predicted by the model in memory, the one the user trained: the reference is
    what it predicts. A reloaded model that predicts otherwise lost something on the way
    through the file (state that is not a variable, a dtype policy its config dropped):
    refused, or with allow_mismatch recorded with the in-memory outputs as the reference."""
    from envlock.diagnosis.compare import compare_outputs

    try:
        mine = _predict_in_memory(model, probe_in, list(reloaded), options.batch_size)
    except Exception as exc:  # a model that cannot predict in this process: the reload stands
        return reloaded, f"the probe could not be predicted with the model in memory ({exc})"
    same = mine.keys() == reloaded.keys() and all(
        mine[k].dtype == reloaded[k].dtype and np.array_equal(mine[k], reloaded[k], equal_nan=True)
        for k in mine)
    if same:
        return reloaded, None
    if not repeatable:
        return reloaded, ("the model is random at inference, so the model in memory and the one "
                          "loaded back could not be compared")
    worst = ""
    if mine.keys() == reloaded.keys():
        comps = compare_outputs(mine, reloaded, atol=options.atol, rtol=options.rtol)
        w = max(comps, key=lambda c: c.max_abs_diff)
        worst = (f" (output {w.name}: up to {w.max_abs_diff:.3g}"
                 + (f", dtype {reloaded[w.name].dtype} instead of {mine[w.name].dtype}"
                    if mine[w.name].dtype != reloaded[w.name].dtype else "") + ")")
    what = (f"{path.name} loaded back predicts other values than the model in memory{worst}: state "
            "that is not a variable was not saved, or a global setting its config dropped")
    if not options.allow_mismatch:
        raise MismatchError(f"reload_differs: {what}", cause="weights_not_restored",
                            hint="fix what the file does not keep (get_config, weights) and save "
                            "again; allow_mismatch=True records the in-memory predictions as the "
                            "reference")
    if mine.keys() != reloaded.keys():
        return reloaded, what
    return mine, what + " (saved anyway: the reference is the model in memory's predictions)"


