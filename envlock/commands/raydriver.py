"""The driver's side of `envlock run --ray`: the connection, the actor pool, the written shards.

``envlock.ray`` holds what runs in the actors; this module connects to the cluster (or starts a
local instance), starts a pool of ``ShardPredictor`` actors through Ray Data, waits until every
actor has proven its node, writes each shard it gets back, and stops Ray Data's execution
before it lets go of Ray.

Stopping matters: Ray Data runs threads on the driver (its scheduling loop, block fetchers),
and a thread that calls into Ray's core worker after ``ray.shutdown()`` makes Ray's C++ end the
process (exit 1) before envlock has said why the run failed. So the execution is stopped and
its threads waited for before the driver disconnects, and when the run failed, the driver
disconnects only at exit, after the error is reported.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from envlock.commands.shards import (
    PROVENANCE_SUFFIX,
    Shard,
    ShardDone,
    ShardResult,
    ShardRunResult,
    find_shards,
    inspect_shards,
    output_name,
    prepare_output_dir,
    provenance_doc,
    write_atomic,
    write_provenance,
)
from envlock.errors import BadInputError, EnvlockError, MismatchError, WorkerError
from envlock.ray import (
    ACTOR_RESTARTS,
    NodeReady,
    ShardPredictor,
    _actor_options,
    _import_ray,
    _raise_row,
)

# A step of one actor while it prepares its node: {"node_id", "hostname", "pid", "event"} where
# event is "preparing" (resolving the environment), "waiting" (another actor of the node builds
# it) or "building". Its verdict (environment built or reused, probe) comes through NodeReady.
NodeStatus = Callable[[Mapping[str, Any]], None]
# Ray Data's threads on the driver that end once its execution is stopped: the scheduling loop,
# its metadata fetcher, the block fetchers of the row iterator. Waited for before disconnecting.
# (Its "Prefetcher" thread is left: it sleeps on a condition until the next blocks it is given,
# and the closed iterator gives it none; it would only make the wait time out.)
_RAY_DATA_THREADS = ("StreamingExecutor", "ray-data-metadata-prefetch", "iter_threaded")
STOP_SECONDS = 30.0


def _registry(expected: int) -> Any:
    """A small actor where every ShardPredictor reports its steps, then its node, build and probe
    verdict, and waits until all ``expected`` have: no shard is predicted before every node is
    proven."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Registry:
        def __init__(self) -> None:
            self.actors: list[dict[str, Any]] = []
            self.events: list[dict[str, Any]] = []
            self.complete = asyncio.Event()

        async def note(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        async def report(self, facts: dict[str, Any]) -> None:
            self.actors.append(facts)
            if len(self.actors) >= expected:
                self.complete.set()

        async def wait_all(self, timeout: float) -> None:
            # Bounded: a pool that Ray cannot fill (too few CPUs) must not hang the run.
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.complete.wait(), timeout)

        async def since(self, events: int, actors: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return self.events[events:], self.actors[actors:]

    return Registry.remote()  # type: ignore[attr-defined]


class _Watcher:
    """Polls the registry on a thread: each actor's steps and verdict are shown as they come."""

    def __init__(self, registry: Any, on_node: NodeReady | None, on_status: NodeStatus | None) -> None:
        self.registry = registry
        self.on_node = on_node
        self.on_status = on_status
        self.seen: list[dict[str, Any]] = []
        self.events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="envlock-ray-watcher", daemon=True)

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

        with self._lock:
            try:
                events, actors = ray.get(self.registry.since.remote(self.events, len(self.seen)), timeout=30)
            except Exception:  # the cluster is going away; the driver reports why
                return list(self.seen)
            self.events += len(events)
            for event in events:
                if self.on_status is not None:
                    self.on_status(event)
            for facts in actors:
                self.seen.append(facts)
                if self.on_node is not None:
                    self.on_node(facts)
            return list(self.seen)


def _stop_execution(rows: Any, registry: Any, started: set[threading.Thread]) -> None:
    """Stop Ray Data's execution and let go of every handle while Ray is still connected.

    Closing the row iterator shuts Ray Data's executor down (its actors are killed), but the
    executor waits only 2 s for its scheduling thread: the thread is waited for here."""
    import ray

    with suppress(Exception):
        rows.close()
    deadline = time.monotonic() + STOP_SECONDS
    for thread in threading.enumerate():
        if thread not in started and thread.name.startswith(_RAY_DATA_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logging.getLogger(__name__).warning("Ray Data's thread %s still runs", thread.name)
    with suppress(Exception):
        ray.kill(registry)
    gc.collect()  # ObjectRefs and actor handles held in cycles go now, not in a thread later


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
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            os.dup2(real, 2)
        # else a failed run: Ray disconnects at exit, and what its C++ says then goes to the log.
        # Either way envlock's last lines (the error, the summary) go through a stream on the
        # real stderr: Ray's core worker may point descriptor 2 at a file of its own.
        sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
        stream.close()


def _disconnect_at_exit() -> None:
    import ray

    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    ray.shutdown()


@contextmanager
def connected(address: str | None) -> Iterator[str]:
    """Connect to ADDRESS, or $RAY_ADDRESS, or start a local Ray instance and stop it after.

    After a failure the driver stays connected until the process exits: the error is reported
    first, then Ray is let go of (a local instance is stopped) at exit."""
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
    except BaseException:
        if started:
            atexit.register(_disconnect_at_exit)
        raise
    if started:
        ray.shutdown()


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_shards_on_ray(model: str | os.PathLike[str], input_arg: str, output: Path | None, *,
                      address: str | None = None, actors: int | None = None, batch_size: int = 32,
                      validate: bool = True, on_start: Callable[[list[Shard]], None] | None = None,
                      on_shard: ShardDone | None = None, on_node: NodeReady | None = None,
                      on_status: NodeStatus | None = None, **session_kwargs: Any) -> ShardRunResult:
    """Every shard on the cluster, whole shards per actor; outputs written here, atomically."""
    t0 = time.perf_counter()
    if batch_size < 1:
        raise BadInputError("--batch-size must be at least 1")
    if actors is not None and actors < 1:
        raise BadInputError("--actors must be at least 1")
    model_path = Path(model).resolve()
    saved = _saved_model(model_path)
    n_outputs = len(saved.get("outputs") or [1])
    paths = find_shards(input_arg)
    shards = inspect_shards(paths, list(saved["inputs"]))  # exit 2 before a cluster is touched
    outdir = prepare_output_dir(output, paths)
    with connected(address) as where:
        # Every actor of the pool must start before any predicts (each proves its node first):
        # no more actors than the cluster has CPUs, nor than there are shards.
        pool = min(actors or len(shards), len(shards), _cluster_cpus())
        if on_start is not None:
            on_start(shards)
        started = set(threading.enumerate())
        registry = _registry(pool)
        rows = _shard_rows(shards, pool, (str(model_path), _actor_options(session_kwargs), validate,
                                          batch_size, n_outputs, registry))
        results: list[ShardResult] = []
        try:
            with _Watcher(registry, on_node, on_status) as watcher:
                for row in rows:
                    if row["error"]:
                        _raise_row(json.loads(row["error"]))
                    # Every actor reported before any shard was predicted: one refusal anywhere
                    # stops the run before a shard is written.
                    _raise_refusal(watcher.poll())
                    facts = json.loads(row["facts"])
                    shard = shards[int(row["index"])]
                    results.append(_write_shard(model_path, shard, outdir, n_outputs, row, facts, batch_size))
                    if on_shard is not None:
                        on_shard(results[-1])
            reported = watcher.poll()
        except EnvlockError:
            raise
        except Exception as exc:  # Ray gave up (an actor died past its restarts, a node was lost)
            raise _ray_failed(exc) from None
        finally:
            _stop_execution(rows, registry, started)
            del rows, registry
    # An actor that got no shard still proved (or failed) its node: its refusal fails the run.
    _raise_refusal(reported)
    results.sort(key=lambda r: str(r.input))
    lock = next((a["lock_sha256"] for a in reported if a.get("lock_sha256")), "")
    return ShardRunResult(model_path, input_arg, outdir, sum(r.rows for r in results), tuple(results),
                          tuple(reported), lock, where, time.perf_counter() - t0)


def _saved_model(model_path: Path) -> Mapping[str, Any]:
    """The sidecar's record of the model (its inputs, its outputs), refused when the model file
    is not the one it was saved with."""
    from envlock.facts.modelfile import inspect_model
    from envlock.sidecar.store import read_sidecar

    sidecar = read_sidecar(model_path)
    if inspect_model(model_path).sha256 != sidecar.manifest["model"]["sha256"]:
        raise MismatchError(f"model_file_changed: {model_path} is not the file the sidecar was saved with",
                            cause="model_file_changed", hint="save it again with `envlock save`")
    return sidecar.manifest["model"]


def _shard_rows(shards: list[Shard], pool: int, actor_args: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
    """The rows Ray Data gives back, one per shard, from a pool of ``pool`` ShardPredictor
    actors. The dataset is held only here: the iterator alone outlives this call."""
    import ray

    ds = ray.data.from_items([{"index": i, "path": str(s.path.resolve())} for i, s in enumerate(shards)],
                             override_num_blocks=len(shards))
    ds = ds.map_batches(ShardPredictor, fn_constructor_args=actor_args,
                        batch_size=1, batch_format="numpy", num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=pool),
                        max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    return iter(ds.iter_rows())


def _raise_refusal(reported: list[dict[str, Any]]) -> None:
    for facts in reported:
        if facts.get("error"):
            _raise_row(facts["error"])


def _ray_failed(exc: Exception) -> WorkerError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WorkerError(f"the Ray job failed after Ray's retries: {type(exc).__name__}: {first}",
                       hint="see the Ray logs of the cluster (`ray logs`)")


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


__all__ = ["NodeStatus", "connected", "run_shards_on_ray", "stderr_to"]
