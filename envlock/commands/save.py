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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envlock.commands.reloader import (  # noqa: F401  (prewarm: envlock.commands.save.prewarm is public)
    CALLER_SETTINGS,
    RELOADER,
    against_in_memory,
    caller_facts,
    caller_threads,
    prewarm,
    reload_key,
    save_sys_path,
    start_worker,
    untracked_lost,
)
from envlock.commands.results import SaveResult
from envlock.commands.saverecord import Captured, render_locks, write_record
from envlock.errors import InputArrayError, WeightsNotRestoredError
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
from envlock.locking.lockfiles import LockedPackage, build_lock
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


@dataclass(frozen=True)
class _Job:
    """What one save works from, handed to each of its steps."""

    path: Path
    settings: Settings
    options: SaveOptions
    workdir: Path
    mem: _InMemory | None  # None: a model file alone (`envlock save`, envlock.lock)
    stage: Stage
    environ: Mapping[str, str]  # the process's environment
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def code_dir(self) -> Path:
        return self.workdir / "code"


@dataclass(frozen=True)
class _Tickets:
    """What was queued on the worker after the load, to be waited for in turn."""

    fingerprint: tuple[int, str]
    stored: tuple[int, str] | None  # the weights stored in the file, when there is no model in memory
    make_probe: tuple[int, str] | None  # None: the user gave the probe
    predictions: list[tuple[tuple[int, str], Path]]  # two runs of the probe, and where each writes
    facts: tuple[int, str]


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
    environ = os.environ  # the process's environment: given to the worker, and recorded
    workdir = Path(tempfile.mkdtemp(prefix="envlock-save-"))
    sys_path = save_sys_path()
    threads = caller_threads()
    key = reload_key(sys_path, custom_objects, threads, environ)
    logs = log_dir(settings)
    try:
        client, ticket = RELOADER.acquire(
            key, lambda: start_worker(logs, sys_path, custom_objects, threads, environ=environ))
        keep = False
        try:
            model.save(os.fspath(path), **save_kwargs)
            mem = _in_memory(model, path, client, ticket)
            probe_path, label = _probe_option(probe, workdir)
            options = SaveOptions(probe=probe_path, probe_label=label,
                                  custom_object_modules=tuple(custom_objects),
                                  allow_mismatch=allow_mismatch, atol=atol, rtol=rtol, vendor=vendor,
                                  command=f"envlock.save(model, {os.fspath(path)!r})")
            result = _lock(_Job(path, settings, options, workdir, mem, on_stage or _quiet, environ))
            keep = mem.main is None  # captured __main__ code may change before the next save
            return result
        finally:
            RELOADER.release(key, client, keep=keep)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _in_memory(model: Any, path: Path, client: WorkerClient, ticket: tuple[int, str] | None) -> _InMemory:
    """The model as this process holds it: what the file loaded back is checked against."""
    config = customcode.read_config(path)
    mains = customcode.main_objects(model, config)
    mem = _InMemory(client, ticket, fingerprint_model(model),
                    registered_modules=tuple(customcode.registered_modules(config)),
                    model=model)
    mem.determinism, mem.untracked = caller_facts(model)
    if mains:
        mem.main = customcode.capture_main(mains)
    return mem


def _probe_option(probe: Any, workdir: Path) -> tuple[Path | None, str | None]:
    """The probe file (arrays passed in are written to ``workdir``) and how to name it."""
    if probe is None:
        return None, None
    if isinstance(probe, (str, os.PathLike)):
        return Path(probe), None
    probe_path = workdir / "user-probe.npz"
    save_npz(probe_path, probe if isinstance(probe, Mapping) else {"__single__": probe})
    return probe_path, "arrays passed to envlock.save"


def lock(path: str | os.PathLike[str], *, settings: Settings | None = None,
         options: SaveOptions | None = None, on_stage: Stage | None = None) -> SaveResult:
    """Write the sidecar for a model file that already exists."""
    workdir = Path(tempfile.mkdtemp(prefix="envlock-save-"))
    try:
        return _lock(_Job(Path(path), settings or Settings.from_env(), options or SaveOptions(), workdir,
                          None, on_stage or _quiet, os.environ))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _quiet(stage: str) -> None:
    pass


def _lock(job: _Job) -> SaveResult:
    t0 = time.perf_counter()
    _check_inputs(job.path, job.options)
    dists = installed()
    pins = sorted({(d["name"], d["version"]) for d in dists if d["kind"] == "index"
                   and d["name"] != "envlock"})
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="envlock-save") as pool:
        # Checking the archive and hashing it read the whole file: for a big model that is
        # seconds, spent while the worker imports the framework instead of before.
        info_f = pool.submit(inspect_model, job.path)
        # Not on the pool: its threads are joined on the way out, and a Ctrl-C must not wait
        # for pages in flight (up to ENVLOCK_HTTP_TIMEOUT).
        lookups_f = in_background(IndexClient(job.settings).lookup_many, pins)
        gpu_f = pool.submit(gpu_facts)
        host = {"python": python_facts(), "platform": platform_facts()}
        client, ticket = _worker(job)
        try:
            info = info_f.result()  # a bad model file: exit 2 before it is loaded
            module_facts, custom_map = _prepare(job, client, ticket)
            job.stage("loading the model back in a fresh process")
            loaded, load_args = _load(job, client, custom_map)
            probe_in, probe_source = _probe_in(job, loaded["inputs"])
            # Queue everything the worker has to do, then lock packages on this side while it
            # works: the two halves take about as long, and neither needs the other.
            job.stage("fingerprinting and running the probe")
            tickets = _queue(job, client, probe_in)
            packages, lock_texts, vendored, command = _lock_packages(job, dists, lookups_f, host)
            fingerprint, mismatched = _weights(job, client, tickets, loaded)
            outs, facts = _outputs(client, tickets)
            loaded = _name_random_layer(client, loaded, outs, probe_in)
            lost = _untracked(job, client, loaded, load_args)
        finally:
            if job.mem is None:
                client.close()
        reference, varying, loaded = _reference(job, outs, probe_in, loaded)
        loaded = {**loaded, "untracked_lost": lost}
        gpus = gpu_f.result()
    if job.mem is not None and job.mem.determinism:
        loaded, facts = _settings_not_applied(job.mem.determinism, loaded, facts)
    captured = Captured(
        info=info, host=host, gpus=gpus, dists=dists, packages=packages, lock_texts=lock_texts,
        command=command, vendored=vendored, loaded=loaded, specs=loaded["inputs"], fingerprint=fingerprint,
        mismatched=mismatched, probe_in=probe_in, probe_source=probe_source, reference=reference,
        repeatable=not varying, varying=varying, facts=facts, code_dir=job.code_dir,
        main=job.mem.main if job.mem is not None else None, module_facts=module_facts,
        environ=job.environ, seconds=job.seconds, t0=t0)
    return write_record(job.path, captured, job.settings, job.options)


def _check_inputs(path: Path, options: SaveOptions) -> None:
    # Missing, a link loop, a zip bomb: said now, before anything starts; the rest of
    # inspect_model's checks (a full read) run while the worker starts.
    check_model_path(path)
    if path.is_file():
        check_archive_directory(path)
    if options.probe is not None and not options.probe.is_file():
        raise InputArrayError(f"{options.probe}: no such probe file")
    preflight_save(path, options.probe)  # found now, not after the whole save has run


def _worker(job: _Job) -> tuple[WorkerClient, tuple[int, str] | None]:
    """The reload worker: the one the API path started, or a fresh one for a model file."""
    if job.mem is not None:
        return job.mem.worker, job.mem.prepare_ticket
    job.stage("starting the worker")
    logs = log_dir(job.settings)
    sys_path = [os.getcwd(), *job.options.extra_sys_path]
    return start_worker(logs, sys_path, job.options.custom_object_modules, environ=job.environ)


def _prepare(job: _Job, client: WorkerClient, ticket: tuple[int, str] | None
             ) -> tuple[list[Any], dict[str, tuple[str, str]]]:
    """Wait for the worker's framework import and have it import what the model needs: the
    modules imported before loading, as recorded, and the custom objects' map for the load."""
    options, mem = job.options, job.mem
    prepared = client.wait(ticket) if ticket is not None else {}
    job.seconds["framework_import"] = prepared.get("import_seconds", 0.0)
    module_facts = list(prepared.get("module_facts") or [])
    if options.custom_object_modules and not module_facts:  # a reused worker
        module_facts = client.request("prepare", {"modules": list(options.custom_object_modules)}
                                      ).get("module_facts") or []
    custom_map: dict[str, tuple[str, str]] = {}
    if mem is not None and mem.registered_modules:
        client.request("prepare", {"modules": list(mem.registered_modules),
                                   "modules_optional": True})
    if mem is not None and mem.main is not None:
        code_dir = job.code_dir
        code_dir.mkdir(parents=True, exist_ok=True)
        (code_dir / f"{MAIN_MODULE}.py").write_text(mem.main.source, encoding="utf-8")
        for rel, src in mem.main.helpers.items():
            (code_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, code_dir / rel)
        # The captured code, not the user's folder, must be what imports: the helpers
        # come from code/ too, as they will at run.
        client.request("prepare", {"sys_path": [str(code_dir)], "modules": [MAIN_MODULE]})
        custom_map = {name: (MAIN_MODULE, q) for name, q in mem.main_objects.items()}
    return module_facts, custom_map


def _load(job: _Job, client: WorkerClient, custom_map: dict[str, tuple[str, str]]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker's answer to loading the file back, and what it was asked with."""
    # A subclassed model's file does not say its inputs: the probe does.
    probe_specs = _probe_specs(job.options.probe) if job.options.probe is not None else None
    load_args: dict[str, Any] = {"path": str(job.path.resolve()), "safe_mode": True,
                                 "custom_objects": custom_map, "import_config_modules": True,
                                 "inputs": probe_specs}
    if job.mem is not None:
        load_args["caller_settings"] = {k: job.mem.determinism.get(k) for k in CALLER_SETTINGS}
    return client.request("load", load_args), load_args


def _probe_in(job: _Job, specs: list[dict[str, Any]]) -> tuple[Path, str]:
    """Where the probe's inputs go (written now from the user's probe, or by the worker
    later), and where they came from."""
    probe_in = job.workdir / "probe-in.npz"
    if job.options.probe is None:
        return probe_in, "generated"
    save_npz(probe_in, _read_probe_file(job.options.probe, specs))
    return probe_in, job.options.probe_label or str(job.options.probe)


def _queue(job: _Job, client: WorkerClient, probe_in: Path) -> _Tickets:
    options = job.options
    fingerprint = client.send("fingerprint")
    stored = client.send("stored_weights") if job.mem is None else None
    make = None if options.probe is not None else client.send(
        "make_probe", {"path": str(probe_in), "seed": options.seed, "rows": options.probe_rows})
    out_paths = [job.workdir / f"probe-out-{i}.npz" for i in range(2)]
    predictions = [(client.send("predict", {"input": str(probe_in), "output": str(out),
                                            "batch_size": options.batch_size, "format": "npz"}), out)
                   for out in out_paths]
    return _Tickets(fingerprint, stored, make, predictions, client.send("facts"))


def _lock_packages(job: _Job, dists: list[dict[str, Any]], lookups_f: Future[Any], host: dict[str, Any]
                   ) -> tuple[list[LockedPackage], dict[str, bytes], vendor.VendorResult | None, str]:
    """The packages with what the index said of them, their lock files, the wheels vendored
    (with --vendor), and the command the lock files name."""
    tl = time.perf_counter()
    lookups = lookups_f.result()
    job.seconds["index_wait"] = time.perf_counter() - tl
    packages = build_lock(dists, lookups)
    command = job.options.command or "envlock save " + shlex.quote(job.path.name)
    lock_texts = render_locks(packages, host["python"]["version"], command, job.settings)
    vendored = None
    if job.options.vendor:
        job.stage("vendoring wheels")
        vendored = vendor.vendor(packages, dists, job.settings,
                                    reuse=[sidecar_path(job.path) / vendor.WHEELS_DIR])
    return packages, lock_texts, vendored, command


def _weights(job: _Job, client: WorkerClient, tickets: _Tickets, loaded: dict[str, Any]
             ) -> tuple[dict[str, Any], list[str]]:
    """The reloaded model's weights fingerprint, and the layers whose weights did not come
    back (refused unless allow_mismatch)."""
    fingerprint = client.wait(tickets.fingerprint)
    if job.mem is not None:
        mismatched = compare_fingerprints(job.mem.fingerprint, fingerprint)
        against = "the model in memory"
    else:
        assert tickets.stored is not None
        mismatched = compare_with_stored(client.wait(tickets.stored), fingerprint)
        against = "the weights stored in the file"
    if mismatched and not job.options.allow_mismatch:
        custom_layers = [c["qualname"] for c in loaded["custom_objects"] if c.get("kind") == "class"]
        raise WeightsNotRestoredError(mismatched, detail=f"compared with {against}",
                                      custom_layers=custom_layers)
    return fingerprint, mismatched


def _outputs(client: WorkerClient, tickets: _Tickets) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The two runs' outputs, and the worker's facts."""
    if tickets.make_probe is not None:
        client.wait(tickets.make_probe)
    outs = []
    for ticket, out in tickets.predictions:
        meta = client.wait(ticket)
        with np.load(out, allow_pickle=False) as npz:
            outs.append({m["name"]: npz[m["name"]] for m in meta["outputs"]})
    return outs, client.wait(tickets.facts)


def _name_random_layer(client: WorkerClient, loaded: dict[str, Any], outs: list[dict[str, np.ndarray]],
                       probe_in: Path) -> dict[str, Any]:
    if not any(not np.array_equal(outs[0][k], outs[1][k], equal_nan=True) for k in outs[0]):
        return loaded
    # Name the layer that draws random numbers at inference.
    layer = client.request("random_layer", {"input": str(probe_in)}).get("layer")
    if not layer:
        return loaded
    return {**loaded, "static_findings": [
        *loaded.get("static_findings", []),
        {"code": "random_layers_active", "layer": layer,
         "evidence": "its output differs between two calls on the same input in "
                     "inference mode (a random op that ignores `training`)"}]}


def _untracked(job: _Job, client: WorkerClient, loaded: dict[str, Any], load_args: dict[str, Any]
               ) -> list[dict[str, Any]]:
    # Array state outside the variables: compared with the model in memory, or (from a
    # file alone) with a second load, which draws it anew if it is random.
    held = loaded.get("untracked_arrays") or []
    if job.mem is not None:
        return untracked_lost(held, job.mem.untracked, "the model in memory")
    if held:
        again = client.request("load", load_args).get("untracked_arrays")
        return untracked_lost(held, again, "a second load")
    return []


def _reference(job: _Job, outs: list[dict[str, np.ndarray]], probe_in: Path, loaded: dict[str, Any]
               ) -> tuple[dict[str, np.ndarray], list[str], dict[str, Any]]:
    """The reference outputs, the outputs that vary between runs, and ``loaded`` with what
    the model in memory said of the reload."""
    # Outputs that two runs in one process gave other bits for: sampled at inference.
    varying = [k for k in outs[0] if not np.array_equal(outs[0][k], outs[1][k], equal_nan=True)]
    reference, in_memory_warning = outs[0], None
    if job.mem is not None and job.mem.model is not None:
        reference, in_memory_warning = against_in_memory(job.mem.model, probe_in, outs[0], not varying,
                                                          job.options, job.path)
    if in_memory_warning:
        loaded = {**loaded, "in_memory_warning": in_memory_warning}
    return reference, varying, loaded


def _settings_not_applied(determinism: dict[str, Any], loaded: dict[str, Any], facts: dict[str, Any]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    # What the reload worker ran with, against the training process: the reference was
    # computed with the worker's, so any that it could not take on is said.
    worker = facts["determinism"]
    loaded = {**loaded, "settings_not_applied": {
        k: {"training": v, "reload": worker.get(k)} for k, v in determinism.items()
        if k in worker and v is not None and worker.get(k) is not None and worker.get(k) != v}}
    return loaded, {**facts, "determinism": {**facts["determinism"], **determinism}}
