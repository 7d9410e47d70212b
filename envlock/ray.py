"""Batch inference on a Ray cluster, every node in the locked environment (DESIGN section 5).

Ray runs on the driver and the cluster, never inside the locked environment: each actor is
envlock's host code. It verifies the sidecar, builds or reuses the environment in its node's
cache (a file lock: one build per node however many actors start at once), starts the usual
worker in it, replays the probe on the node's hardware, and only then predicts. Batches reach
the worker as files in a node-local folder, which it memory-maps: no pickle, no JSON.

    ds = ray.data.read_parquet("s3://bucket/features/")
    preds = envlock.ray.predict(ds, "model.keras", concurrency=8)

``envlock run MODEL --input SHARDS --output OUTDIR --ray [ADDRESS]`` predicts whole shards
(the same bits as a single-machine run of each) through ``ShardPredictor`` actors; the driver's
side (connection, pool, written shards) is ``envlock.commands.raydriver``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envlock.commands.shards import ShardWorker, inspect_shard, node_facts, output_name
from envlock.errors import (
    BadInputError,
    EnvironmentBuildError,
    EnvlockError,
    InputArrayError,
    MismatchError,
    WorkerError,
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


def _open_worker(model: str, options: Mapping[str, Any], *, validate: bool, batch_size: int,
                 on_build_event: Callable[[Any], None] | None = None) -> ShardWorker:
    from envlock.commands.run import ModelSession

    session = ModelSession(model, **_actor_options(options), on_build_event=on_build_event)
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

        from envlock.sidecar.arrays import check_input_file, save_npz

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
        node = node_facts(_node_id())
        where = {"node_id": node["node_id"], "hostname": node["hostname"], "pid": os.getpid()}
        steps: set[str] = set()

        def note(event: str) -> None:  # fire and forget: the driver shows it while this builds
            if registry is not None and event not in steps:
                steps.add(event)
                registry.note.remote({**where, "event": event})

        def on_build_event(ev: Any) -> None:
            if ev.stage == "wait":
                note("waiting")
            elif ev.stage in ("interpreter", "venv", "install"):
                note("building")

        note("preparing")
        try:
            self.worker = _open_worker(model, options, validate=validate, batch_size=batch_size,
                                       on_build_event=on_build_event)
        except EnvlockError as err:
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



__all__ = ["Predictor", "ShardPredictor", "predict"]
