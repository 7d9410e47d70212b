"""`envlock save` / `envlock.lock`: capture the environment and reference predictions.

Order matters for speed: the package-index look-ups (network) and GPU facts run on threads
while the worker imports the framework, loads the file back, fingerprints and probes it.
The sidecar is written last, all at once (see sidecar.write_sidecar).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import envlock
from envlock import customcode, templating, vendoring
from envlock._worker.fingerprint import compare_fingerprints, compare_with_stored, fingerprint_model
from envlock._worker.framework import ENV_VARS
from envlock._worker.inventory import installed
from envlock.arrayfiles import save_npz
from envlock.errors import InputArrayError, MismatchError, WeightsNotRestoredError
from envlock.fs import log_dir, preflight_save
from envlock.gpu import cuda_env_facts, gpu_facts
from envlock.hostfacts import platform_facts, python_facts
from envlock.httpclient import in_background
from envlock.index import IndexClient
from envlock.lockfiles import build_lock, render_pylock, render_requirements
from envlock.modelfile import (
    ModelInfo,
    check_archive_directory,
    check_model_path,
    inspect_model,
    sidecar_path,
)
from envlock.results import SaveResult
from envlock.settings import Settings
from envlock.sidecar import MAIN_MODULE, write_sidecar
from envlock.trust import trust
from envlock.worker import WorkerClient

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
    # The calling (training) process's own settings, read where they were set (see _caller_facts).
    determinism: dict[str, Any] = field(default_factory=dict)
    untracked: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main_objects(self) -> dict[str, str]:
        return self.main.objects if self.main is not None else {}



# What the reload worker is given from the caller before it loads: these change how the model
# is built. Threads, TF32 and jit cannot be changed in a running worker; they are recorded.
_CALLER_SETTINGS = ("dtype_policy", "floatx", "op_determinism")
_CALLER_RECORDED = (*_CALLER_SETTINGS, "tf32", "intra_op_threads", "inter_op_threads", "jit")


def _caller_facts(model: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The determinism settings of this (the training) process, and the numpy arrays its
    model's layers hold outside their variables."""
    from envlock._worker.framework import determinism_facts
    from envlock._worker.model import untracked_arrays

    try:
        facts = determinism_facts()
    except Exception:  # a framework too old or too new to say: the worker's facts stand
        facts = {}
    try:
        untracked = untracked_arrays(model)
    except Exception:
        untracked = []
    return {k: facts.get(k) for k in _CALLER_RECORDED if k in facts}, untracked


def _worker_env() -> dict[str, str]:
    # The environment being captured is this one: the worker gets it as it is, so that every
    # setting it reads (oneDNN, threads, hash seed) is the user's.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def _start_worker(log_dir: Path, sys_path: Sequence[str], modules: Sequence[str]) -> tuple[WorkerClient,
                                                                                         tuple[int, str]]:
    client = WorkerClient(sys.executable, env=_worker_env(),
                          log_path=log_dir / f"save-worker-{os.getpid()}-{time.time_ns()}.log",
                          cwd=os.getcwd(), timeout=600)
    client.start()
    ticket = client.send("prepare", {"sys_path": list(sys_path), "modules": list(modules)})
    return client, ticket


class _Reloader:
    """One warm reload worker per process, for repeated ``envlock.save`` calls.

    The first save pays for the worker's framework import; later saves (checkpoints in a
    training loop) reuse the worker when it was started with the same interpreter, folder,
    environment variables and custom modules, so that what it reads is still what this
    process would read. Each load clears the Keras session first, so a load sees what a
    fresh process would. Not used when __main__ objects are captured (their source may
    change between saves), and dropped after any failure.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (key, worker, the ticket of its pending `prepare`, or None once answered)
        self._idle: tuple[str, WorkerClient, tuple[int, str] | None] | None = None
        atexit.register(self.close)

    def acquire(self, key: str, start: Callable[[], tuple[WorkerClient, tuple[int, str]]]
                ) -> tuple[WorkerClient, tuple[int, str] | None]:
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None:
            if idle[0] == key and idle[1].alive():
                return idle[1], idle[2]
            idle[1].close()
        return start()

    def release(self, key: str, client: WorkerClient, *, keep: bool,
                pending: tuple[int, str] | None = None) -> None:
        if keep:
            with self._lock:
                if self._idle is None:
                    self._idle = (key, client, pending)
                    return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None:
            idle[1].close()


def _save_sys_path() -> list[str]:
    return [os.getcwd(), *(p for p in sys.path if p and os.path.isdir(p))]


def prewarm(*, custom_objects: Sequence[str] = (), settings: Settings | None = None) -> None:
    """Start the reload worker now, so the first ``envlock.save`` of this process finds
    TensorFlow already imported in it (the bulk of a first save). Call it at the top of a
    training script; it returns at once. A save from another folder, with other environment
    variables or custom modules, starts a fresh worker anyway.
    """
    settings = settings or Settings.from_env()
    sys_path = _save_sys_path()
    logs = log_dir(settings)
    client, ticket = _start_worker(logs, sys_path, custom_objects)
    _RELOADER.release(_reload_key(sys_path, custom_objects), client, keep=True, pending=ticket)


_RELOADER = _Reloader()


def _reload_key(sys_path: Sequence[str], modules: Sequence[str]) -> str:
    parts = [sys.executable, os.getcwd(), *sys_path, "|", *modules, "|",
             *(f"{k}={v}" for k, v in sorted(os.environ.items()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


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
    sys_path = _save_sys_path()
    key = _reload_key(sys_path, custom_objects)
    logs = log_dir(settings)
    try:
        client, ticket = _RELOADER.acquire(key, lambda: _start_worker(logs, sys_path, custom_objects))
        keep = False
        try:
            model.save(os.fspath(path), **save_kwargs)
            config = customcode.read_config(path)
            mains = customcode.main_objects(model, config)
            mem = _InMemory(client, ticket, fingerprint_model(model),
                            registered_modules=tuple(customcode.registered_modules(config)),
                            model=model)
            mem.determinism, mem.untracked = _caller_facts(model)
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
            _RELOADER.release(key, client, keep=keep)
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
            client, ticket = _start_worker(logs, sys_path, options.custom_object_modules)
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
                load_args["caller_settings"] = {k: mem.determinism.get(k) for k in _CALLER_SETTINGS}
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
            lock_texts = _render_locks(packages, host["python"]["version"], command, settings)
            vendored = None
            if options.vendor:
                stage("vendoring wheels")
                vendored = vendoring.vendor(packages, dists, settings,
                                            reuse=[sidecar_path(path) / vendoring.WHEELS_DIR])

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
        facts = {**facts, "determinism": {**facts["determinism"], **mem.determinism}}
    return _write(path, info, settings, options, host, gpus, dists, packages, lock_texts, loaded,
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
    from envlock.compare import compare_outputs

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


def _render_locks(packages: list[Any], python_version: str, command: str,
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


def _write(path: Path, info: ModelInfo, settings: Settings, options: SaveOptions, host: dict[str, Any],
           gpus: dict[str, Any], dists: list[dict[str, Any]], packages: list[Any],
           lock_texts: dict[str, bytes], loaded: dict[str, Any], specs: list[dict[str, Any]],
           fingerprint: dict[str, Any], mismatched: list[str], probe_in: Path,
           outputs: dict[str, np.ndarray], probe_source: str, repeatable: bool, facts: dict[str, Any],
           code_dir: Path, mem: _InMemory | None, seconds: dict[str, float], t0: float,
           command: str, *, vendored: vendoring.VendorResult | None = None,
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
        from envlock import condalock  # only inside conda

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
    for u in loaded.get("untracked_lost") or []:
        warnings.append(f"layer {u['layer']}: {u['evidence']} (it is made anew at every load: make "
                        "it a weight with add_weight(trainable=False), or draw it from a seed in "
                        "get_config())")
    if os.environ.get("PYTHONPATH"):
        warnings.append("PYTHONPATH is set: modules found through it are not locked")

    if vendored is not None:
        files.update(vendoring.sidecar_files(vendored))
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
