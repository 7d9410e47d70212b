"""Batch inference on a Ray cluster, every node in the locked environment (DESIGN section 5).

Ray runs on the driver and the cluster, never inside the locked environment: each actor is
envlock's host code. It verifies the sidecar, builds or reuses the environment in its node's
cache (a file lock: one build per node however many actors start at once), starts the usual
worker in it, replays the probe on the node's hardware, and only then predicts. Batches reach
the worker as files in a node-local folder, which it memory-maps: no pickle, no JSON.

    ds = ray.data.read_parquet("s3://bucket/features/")
    preds = envlock.ray.predict(ds, "model.keras", concurrency=8)

``envlock run MODEL --input SHARDS --output OUTDIR --ray [ADDRESS]`` predicts whole shards
(the same bits as a single-machine run of each) and writes them on the driver, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envlock.errors import (
    BadInputError,
    EnvironmentBuildError,
    EnvlockError,
    InputArrayError,
    MismatchError,
    WorkerError,
)
from envlock.shards import (
    PROVENANCE_SUFFIX,
    Shard,
    ShardDone,
    ShardResult,
    ShardRunResult,
    ShardWorker,
    find_shards,
    inspect_shard,
    inspect_shards,
    output_name,
    prepare_output_dir,
    provenance_doc,
    write_atomic,
    write_provenance,
)

if TYPE_CHECKING:
    import numpy as np

# What an actor may receive: plain options. Callbacks and Settings stay on the driver; each
# node reads its own ENVLOCK_HOME (its own cache) from its environment.
_DRIVER_ONLY = ("on_stage", "on_build_event", "settings")
_ERRORS: dict[str, type[EnvlockError]] = {
    "BadInputError": BadInputError, "InputArrayError": InputArrayError, "MismatchError": MismatchError,
    "EnvironmentBuildError": EnvironmentBuildError, "WorkerError": WorkerError}
NodeReady = Callable[[Mapping[str, Any]], None]
# How long an actor waits for the rest of the pool to prove their nodes before its first shard.
BARRIER_SECONDS = 1800.0
# Ray Data restarts a dead actor without end by default; a node that kills every actor must
# end the run instead.
ACTOR_RESTARTS = 3


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInputError("--ray needs Ray on this machine", hint="pip install 'envlock[ray]'") from None
    return ray


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _actor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _DRIVER_ONLY}


def _open_worker(model: str, options: Mapping[str, Any], *, validate: bool, batch_size: int) -> ShardWorker:
    from envlock.running import ModelSession

    session = ModelSession(model, **_actor_options(options))
    worker = ShardWorker(session, validate=validate, batch_size=batch_size, node_id=_node_id())
    try:
        worker.open()
    except BaseException:
        worker.close()
        raise
    return worker


class Predictor:
    """A callable class for ``Dataset.map_batches``: the model, in its locked environment.

    Takes the options of ``envlock.load`` (``strategy``, ``trust_code``, ``unsafe``,
    ``use_recorded_env``, ...) plus ``validate`` (refuse a node whose probe does not match)
    and ``batch_size`` (Keras' batch inside the worker; 32 gives ``model.predict``'s bits).
    A batch's columns are the model's input names (``data`` from ``read_numpy`` is taken for a
    one-input model); every other column passes through. The predictions come back as columns
    named like the model's outputs. ``provenance=True`` adds an ``envlock_provenance`` column
    (JSON: node, CPU/GPU, lock, probe verdict).
    """

    def __init__(self, model: str | os.PathLike[str], *, validate: bool = True, batch_size: int = 32,
                 provenance: bool = False, **load_options: Any) -> None:
        self.model = str(model)
        self.provenance = provenance
        self._worker = _open_worker(self.model, load_options, validate=validate, batch_size=batch_size)
        self.facts = self._worker.facts
        self._scratch = Path(tempfile.mkdtemp(prefix="envlock-ray-"))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        from envlock.arrayfiles import check_input_file, save_npz

        session = self._worker.session
        names = [s["name"] for s in session.specs]
        arrays = {n: batch[n] for n in names if n in batch}
        if len(names) == 1 and not arrays and "data" in batch:
            arrays = {names[0]: batch["data"]}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputArrayError(f"the batch has no column for input(s) {', '.join(missing)} "
                                  f"(it has {', '.join(batch) or 'none'})")
        # A one-input batch as .npy, which the worker memory-maps; several inputs as an .npz.
        if len(arrays) == 1:
            pin = self._scratch / "batch.npy"
            np.save(pin, np.ascontiguousarray(next(iter(arrays.values()))), allow_pickle=False)
        else:
            pin = self._scratch / "batch.npz"
            save_npz(pin, arrays)
        pout = self._scratch / "out.npz"
        try:
            check_input_file(pin, session.specs)
            meta = session.predict_file(pin, pout, batch_size=self._worker.batch_size)
            with np.load(pout, allow_pickle=False) as npz:
                outputs = {m["name"]: np.array(npz[m["name"]]) for m in meta["outputs"]}
        finally:
            pin.unlink(missing_ok=True)
            pout.unlink(missing_ok=True)
        taken = {"data"} if "data" in batch and names[0] not in batch else set()
        result = {k: v for k, v in batch.items() if k not in arrays and k not in taken}
        result.update(outputs)
        if self.provenance:
            n = len(next(iter(outputs.values())))
            result["envlock_provenance"] = np.array([json.dumps(self.facts, sort_keys=True)] * n)
        return result

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
        shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)


def predict(dataset: Any, model: str | os.PathLike[str], *, concurrency: int | tuple[int, int] = 1,
            num_cpus: float = 1, batch_size: int = 32, map_batch_size: int | None = 4096,
            validate: bool = True, provenance: bool = False, **load_options: Any) -> Any:
    """``dataset`` mapped through ``Predictor`` on an actor pool: a Dataset of predictions."""
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        Predictor, fn_constructor_args=(str(model),),
        fn_constructor_kwargs={"validate": validate, "batch_size": batch_size, "provenance": provenance,
                               **_actor_options(load_options)},
        batch_size=map_batch_size, batch_format="numpy", num_cpus=num_cpus,
        compute=ActorPoolStrategy(size=concurrency) if isinstance(concurrency, int)
        else ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]))


# -- whole shards, for `envlock run --ray` --------------------------------------------------------

class ShardPredictor:
    """One actor of `envlock run --ray`: predicts whole shards on its node, returns their bytes.

    A failure in the actor comes back as a row (error class, message, exit code), not as an
    exception: Ray would retry it, and a probe refusal or a failed build does not get better
    by retrying. An actor that dies is Ray's to restart.
    """

    def __init__(self, model: str, options: Mapping[str, Any], validate: bool, batch_size: int,
                 n_outputs: int, registry: Any = None) -> None:
        import ray

        self.n_outputs = n_outputs
        self.error: dict[str, Any] | None = None
        self.worker: ShardWorker | None = None
        try:
            self.worker = _open_worker(model, options, validate=validate, batch_size=batch_size)
        except EnvlockError as err:
            from envlock.shards import node_facts

            node = node_facts(_node_id())
            self.error = _error_row(err, node)
            self.facts: dict[str, Any] = dict(node)
        else:
            self.facts = dict(self.worker.facts)
        self._scratch = Path(tempfile.mkdtemp(prefix="envlock-ray-shards-"))
        if registry is not None:  # every actor's verdict reaches the driver, shards or not
            ray.get(registry.report.remote({**self.facts, "error": self.error}))
            ray.get(registry.wait_all.remote(BARRIER_SECONDS))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        rows: list[dict[str, Any]] = []
        for index, path in zip(batch["index"], batch["path"]):
            row: dict[str, Any] = {"index": int(index), "path": str(path), "data": b"", "seconds": 0.0,
                                   "outputs": "[]", "error": "", "facts": json.dumps(self.facts)}
            if self.error is None:
                assert self.worker is not None
                t = time.perf_counter()
                try:
                    shard = inspect_shard(Path(str(path)), self.worker.session.specs)
                    out = self._scratch / output_name(shard.stem, self.n_outputs)
                    meta = self.worker.predict_shard(shard, out)
                    row["data"] = out.read_bytes()
                    out.unlink()
                    row["outputs"] = json.dumps(meta["outputs"])
                except EnvlockError as err:
                    row["error"] = json.dumps(_error_row(err, self.worker.node))
                row["seconds"] = time.perf_counter() - t
            else:
                row["error"] = json.dumps(self.error)
            rows.append(row)
        return {k: np.array([r[k] for r in rows], dtype=object if k == "data" else None)
                for k in rows[0]}

    def __del__(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.close()  # type: ignore[union-attr]
        shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)


def _error_row(err: EnvlockError, node: Mapping[str, Any]) -> dict[str, Any]:
    """An actor's failure as plain data, its message naming the node (a probe refusal does)."""
    name = next((c.__name__ for c in type(err).__mro__ if c.__name__ in _ERRORS), "WorkerError")
    message = str(err) if isinstance(err, MismatchError) else \
        f"node {node.get('node_id')} ({node.get('hostname')}): {err}"
    return {"class": name, "message": message, "hint": err.hint, "cause": err.cause}


def _raise_row(error: Mapping[str, Any]) -> None:
    cls = _ERRORS.get(error["class"], WorkerError)
    raise cls(error["message"], hint=error.get("hint"), cause=error.get("cause"))


def _registry(expected: int) -> Any:
    """A small actor where every ShardPredictor reports its node, build and probe verdict, and
    waits until all ``expected`` have: no shard is predicted before every node is proven."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Registry:
        def __init__(self) -> None:
            self.actors: list[dict[str, Any]] = []
            self.complete = asyncio.Event()

        async def report(self, facts: dict[str, Any]) -> None:
            self.actors.append(facts)
            if len(self.actors) >= expected:
                self.complete.set()

        async def wait_all(self, timeout: float) -> None:
            # Bounded: a pool that Ray cannot fill (too few CPUs) must not hang the run.
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.complete.wait(), timeout)

        async def all(self) -> list[dict[str, Any]]:
            return list(self.actors)

    return Registry.remote()  # type: ignore[attr-defined]


class _Watcher:
    """Polls the registry on a thread: each actor's status is shown as soon as it is ready."""

    def __init__(self, registry: Any, on_node: NodeReady | None) -> None:
        import threading

        self.registry = registry
        self.on_node = on_node
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> list[dict[str, Any]]:
        import ray

        try:
            actors = ray.get(self.registry.all.remote(), timeout=30)
        except Exception:  # the cluster is going away; the driver reports why
            return self.seen
        for facts in actors[len(self.seen):]:
            self.seen.append(facts)
            if self.on_node is not None:
                self.on_node(facts)
        return self.seen


# -- the cluster --------------------------------------------------------------------------------

def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at ADDRESS."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInputError(f"--ray {address}: not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise BadInputError(f"no Ray cluster reachable at {address} ({exc.strerror or exc})",
                            hint="start one with `ray start --head`, or check the address") from None


@contextmanager
def stderr_to(log: Path) -> Iterator[Any]:
    """Ray's own lines (its C++ core worker writes to file descriptor 2, Ray Data logs) go to
    ``log`` while Ray runs here; yields a text stream on the real stderr for envlock's own."""
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    real = os.dup(2)
    stream = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield stream
    finally:
        sys.stderr.flush()
        stream.flush()
        os.dup2(real, 2)
        # Ray's core worker may point descriptor 2 at a file of its own again as it shuts down:
        # envlock's last lines (the error, the summary) go through a stream on the real stderr.
        sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
        stream.close()


@contextmanager
def connected(address: str | None) -> Iterator[str]:
    """Connect to ADDRESS, or $RAY_ADDRESS, or start a local Ray instance and stop it after."""
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if ray.is_initialized():
        started = False
    else:
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": a new instance for this run, never one found in /tmp/ray by chance.
                ray.init(address="local", include_dashboard=False, **kwargs)
        except ConnectionError as exc:
            raise BadInputError(f"could not connect to the Ray cluster at {address}: "
                                f"{str(exc).splitlines()[0]}",
                                hint="check the address; a cluster with token authentication also needs "
                                "RAY_AUTH_MODE=token here") from None
        started = True
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # envlock draws its own, over rows and shards
    ctx.print_on_execution_start = False
    try:
        yield address or "local"
    finally:
        if started:
            ray.shutdown()


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_shards_on_ray(model: str | os.PathLike[str], input_arg: str, output: Path | None, *,
                      address: str | None = None, actors: int | None = None, batch_size: int = 32,
                      validate: bool = True, on_start: Callable[[list[Shard]], None] | None = None,
                      on_shard: ShardDone | None = None, on_node: NodeReady | None = None,
                      **session_kwargs: Any) -> ShardRunResult:
    """Every shard on the cluster, whole shards per actor; outputs written here, atomically."""
    from envlock.modelfile import inspect_model
    from envlock.sidecar import read_sidecar

    t0 = time.perf_counter()
    if batch_size < 1:
        raise BadInputError("--batch-size must be at least 1")
    if actors is not None and actors < 1:
        raise BadInputError("--actors must be at least 1")
    model_path = Path(model).resolve()
    sidecar = read_sidecar(model_path)
    if inspect_model(model_path).sha256 != sidecar.manifest["model"]["sha256"]:
        raise MismatchError(f"model_file_changed: {model_path} is not the file the sidecar was saved with",
                            cause="model_file_changed", hint="save it again with `envlock save`")
    specs = list(sidecar.manifest["model"]["inputs"])
    n_outputs = len(sidecar.manifest["model"].get("outputs") or [1])
    paths = find_shards(input_arg)
    shards = inspect_shards(paths, specs)  # exit 2 before a cluster is touched
    outdir = prepare_output_dir(output, paths)
    ray = _import_ray()
    with connected(address) as where:
        # Every actor of the pool must start before any predicts (each proves its node first):
        # no more actors than the cluster has CPUs, nor than there are shards.
        pool = min(actors or len(shards), len(shards), _cluster_cpus())
        if on_start is not None:
            on_start(shards)
        ds = ray.data.from_items([{"index": i, "path": str(s.path.resolve())} for i, s in enumerate(shards)],
                                 override_num_blocks=len(shards))
        registry = _registry(pool)
        actor_args = (str(model_path), _actor_options(session_kwargs), validate, batch_size, n_outputs,
                      registry)
        ds = ds.map_batches(ShardPredictor, fn_constructor_args=actor_args,
                            batch_size=1, batch_format="numpy", num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=pool),
                            max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
        results: list[ShardResult] = []
        with _Watcher(registry, on_node) as watcher:
            try:
                for row in ds.iter_rows():
                    if row["error"]:
                        _raise_row(json.loads(row["error"]))
                    # Every actor reported before any shard was predicted: one refusal anywhere
                    # stops the run before a shard is written.
                    for facts in watcher.poll():
                        if facts.get("error"):
                            _raise_row(facts["error"])
                    facts = json.loads(row["facts"])
                    shard = shards[int(row["index"])]
                    results.append(_write_shard(model_path, shard, outdir, n_outputs, row, facts, batch_size))
                    if on_shard is not None:
                        on_shard(results[-1])
            except EnvlockError:
                raise
            except Exception as exc:  # Ray gave up (an actor died past its restarts, a node was lost)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise WorkerError(f"the Ray job failed after Ray's retries: {type(exc).__name__}: {first}",
                                  hint="see the Ray logs of the cluster (`ray logs`)") from None
        reported = watcher.poll()
    # An actor that got no shard still proved (or failed) its node: its refusal fails the run.
    for facts in reported:
        if facts.get("error"):
            _raise_row(facts["error"])
    results.sort(key=lambda r: str(r.input))
    lock = next((a["lock_sha256"] for a in reported if a.get("lock_sha256")), "")
    return ShardRunResult(model_path, input_arg, outdir, sum(r.rows for r in results), tuple(results),
                          tuple(reported), lock, where, time.perf_counter() - t0)


def _write_shard(model: Path, shard: Shard, outdir: Path, n_outputs: int, row: Mapping[str, Any],
                 facts: Mapping[str, Any], batch_size: int) -> ShardResult:
    out = outdir / output_name(shard.stem, n_outputs)
    prov = outdir / f"{shard.stem}{PROVENANCE_SUFFIX}"
    outdir.mkdir(exist_ok=True)
    # Provenance first: an output shard that looks complete always has its provenance.
    write_provenance(prov, provenance_doc(model, str(shard.path), shard.rows, str(out), facts,
                                          json.loads(row["outputs"]), batch_size))
    write_atomic(out, bytes(row["data"]))
    return ShardResult(shard.path, out, prov, shard.rows, float(row["seconds"]),
                       {"node_id": facts.get("node_id"), "hostname": facts.get("hostname")})


__all__ = ["Predictor", "ShardPredictor", "connected", "predict", "run_shards_on_ray"]
