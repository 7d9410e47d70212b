"""Sharded input and output: `envlock run MODEL --input DIR_OR_GLOB --output OUTDIR`.

A shard is one input file (``.npy`` for a one-input model, ``.npz`` keyed by input name, or
Parquet with one column per input). Every shard is predicted on its own, from its first row,
with the run's batch size: the same bits as ``envlock run`` over that file alone. Each gives one
output shard, ``OUTDIR/<stem>.npy`` (``.npz`` for several outputs), renamed into place when
complete, beside ``OUTDIR/<stem>.envlock.json``, its provenance (written first: an output that
looks complete always has one).

This module runs the shards on this machine, one after another, through one worker;
``envlock.ray`` runs the same shards on a Ray cluster with the same per-shard code.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envlock.commands.results import ShardResult, ShardRunResult, Validation
from envlock.errors import BadInputError, InputArrayError, MismatchError
from envlock.sidecar.arrays import check_input_file, save_npz

if TYPE_CHECKING:
    import numpy as np

    from envlock.commands.run import ModelSession

SUFFIXES = (".npy", ".npz", ".parquet")
PROVENANCE_SUFFIX = ".envlock.json"
PROVENANCE_SCHEMA = "envlock.shard/1"
ShardDone = Callable[["ShardResult"], None]
RowsDone = Callable[[int, int], None]


@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int
    dtypes: tuple[str, ...]  # per model input, as stored

    @property
    def stem(self) -> str:
        return self.path.name[: -len(self.path.suffix)]

    @property
    def kind(self) -> str:
        return self.path.suffix[1:]


# -- finding and checking shards -----------------------------------------------------------------

def is_sharded(input_arg: str) -> bool:
    """A folder, a glob or a Parquet file is sharded input; one .npy/.npz file is not."""
    return (Path(input_arg).is_dir() or any(c in input_arg for c in "*?[")
            or input_arg.endswith(".parquet"))


def find_shards(input_arg: str) -> list[Path]:
    p = Path(input_arg)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(f) for f in glob.glob(input_arg) if Path(f).is_file())
    if not found:
        raise BadInputError(f"{input_arg}: no input shards found",
                            hint=f"a folder or glob of {', '.join(SUFFIXES)} files")
    odd = [f for f in found if f.suffix not in SUFFIXES]
    if odd:
        raise BadInputError(f"{odd[0]}: not a shard ({', '.join(SUFFIXES)})")
    stems: dict[str, Path] = {}
    for f in found:
        stem = f.name[: -len(f.suffix)]
        if stem in stems:
            raise BadInputError(f"{stems[stem]} and {f} would both write the output shard {stem}")
        stems[stem] = f
    return found


def _arrow_shape(name: str, t: Any, spec: Mapping[str, Any], where: Path) -> tuple[tuple[int, ...], str]:
    """(inner shape, dtype) of a Parquet column: an Arrow fixed-shape tensor, (nested) lists or scalars."""
    import pyarrow as pa

    if isinstance(t, pa.FixedShapeTensorType):
        return tuple(int(d) for d in t.shape), str(t.value_type.to_pandas_dtype().__name__)
    dims: list[int] = []
    want = list(spec["shape"][1:])
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if pa.types.is_fixed_size_list(t):
            dims.append(int(t.list_size))
        else:  # a variable list: its length is checked row by row when the shard is read
            d = want[len(dims)] if len(dims) < len(want) else None
            dims.append(1 if d is None else int(d))
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise InputArrayError(f"{where}: column {name} holds {t}; only numbers (or lists or tensors "
                              "of numbers) are accepted")
    import numpy as np

    return tuple(dims), str(np.dtype(t.to_pandas_dtype()))


def _parquet_headers(path: Path, specs: Sequence[Mapping[str, Any]]) -> list[tuple[tuple[int, ...], Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputArrayError(f"{path}: reading Parquet shards needs pyarrow, which is not installed "
                              "here", hint="install envlock's parquet (or ray) extra, or pass .npy/.npz "
                              "shards") from None

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        rows = int(meta.metadata.num_rows)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: all "not Parquet"
        raise InputArrayError(f"{path}: not a readable Parquet file ({exc})") from None
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise InputArrayError(f"{path} has no column for input(s) {', '.join(missing)} "
                              f"(it has {', '.join(schema.names) or 'none'})")
    out = []
    for spec in specs:
        inner, dtype = _arrow_shape(spec["name"], schema.field(spec["name"]).type, spec, path)
        out.append(((rows, *inner), dtype))
    return out


def inspect_shard(path: Path, specs: Sequence[Mapping[str, Any]]) -> Shard:
    """Refuse a shard that does not fit the model (exit 2), reading headers only."""
    import numpy as np

    from envlock.sidecar.arrays import read_headers
    from envlock.worker.payload.arrays import check_shapes
    from envlock.worker.payload.model import WorkerFailure

    if path.suffix == ".parquet":
        shapes = _parquet_headers(path, specs)
        try:
            check_shapes(shapes, specs)
        except WorkerFailure as exc:
            raise InputArrayError(f"{path}: {exc}") from None
        return Shard(path, int(shapes[0][0][0]), tuple(str(np.dtype(d)) for _, d in shapes))
    rows = check_input_file(path, specs)
    headers = read_headers(path)
    names = [s["name"] for s in specs]
    if path.suffix == ".npz" and not (len(names) == 1 and len(headers) == 1):
        dtypes = tuple(str(headers[n][1]) for n in names)
    else:
        dtypes = tuple(str(h[1]) for h in headers.values())
    return Shard(path, rows, dtypes)


def inspect_shards(paths: Sequence[Path], specs: Sequence[Mapping[str, Any]]) -> list[Shard]:
    """Every shard fits the model, and all hold the same dtypes (a mix is a pipeline's bug)."""
    shards = [inspect_shard(p, specs) for p in paths]
    first = shards[0]
    for s in shards[1:]:
        if s.dtypes != first.dtypes:
            raise InputArrayError(f"{s.path} holds {', '.join(s.dtypes)} where {first.path} holds "
                                  f"{', '.join(first.dtypes)}: every shard must have the same dtypes")
    return shards


def prepare_output_dir(output: Path | None, shards: Sequence[Path]) -> Path:
    if output is None:
        raise BadInputError("sharded input needs --output OUTDIR (a folder for the output shards)")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"{output}: not a folder", hint="--output names a folder for sharded input")
    if not output.parent.is_dir():
        raise BadInputError(f"{output}: the folder {output.parent} does not exist")
    ins = {p.resolve() for p in shards}
    if output.is_dir():
        for p in ins:
            for suffix in (".npy", ".npz", PROVENANCE_SUFFIX):
                if (output.resolve() / f"{p.name[: -len(p.suffix)]}{suffix}") == p:
                    raise BadInputError(f"{p}: an output shard would replace this input shard",
                                        hint="write to another --output folder")
    return output  # created with the first output shard: a run that fails before leaves nothing


def output_name(stem: str, n_outputs: int) -> str:
    return f"{stem}{'.npz' if n_outputs > 1 else '.npy'}"


# -- reading a shard for the worker ------------------------------------------------------------

def _parquet_arrays(path: Path, specs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[s["name"] for s in specs])
    arrays = {}
    for spec in specs:
        name = spec["name"]
        col = table.column(name).combine_chunks()
        if col.null_count:
            raise InputArrayError(f"{path}: column {name} has {col.null_count} null row(s)")
        if isinstance(col.type, pa.FixedShapeTensorType):
            arrays[name] = np.ascontiguousarray(col.to_numpy_ndarray())
            continue
        values: Any = col
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
                pa.types.is_fixed_size_list(values.type):
            if values.null_count:
                raise InputArrayError(f"{path}: column {name} has null values")
            values = values.flatten()
        flat = values.to_numpy(zero_copy_only=False)
        inner = [(-1 if d is None else int(d)) for d in spec["shape"][1:]]
        try:
            arrays[name] = flat.reshape((len(col), *inner))
        except ValueError:
            raise InputArrayError(f"{path}: the rows of column {name} do not all have the shape "
                                  f"{tuple(spec['shape'][1:])}") from None
    return arrays


def worker_input(shard: Shard, specs: Sequence[Mapping[str, Any]], scratch: Path) -> Path:
    """A file the worker can memory-map: the shard itself, or for Parquet an .npz beside in scratch."""
    if shard.kind != "parquet":
        return shard.path
    target = scratch / f"{shard.stem}.npz"
    save_npz(target, _parquet_arrays(shard.path, specs))
    return target


# -- provenance --------------------------------------------------------------------------------

def lock_sha256(session: ModelSession) -> str:
    return hashlib.sha256(session.sidecar.file("requirements.lock.txt").read_bytes()).hexdigest()


def node_facts(node_id: str | None = None) -> dict[str, Any]:
    """Where a worker runs: the node (Ray's id where there is one), its CPU and GPUs."""
    from envlock.facts.gpu import gpu_facts
    from envlock.facts.host import platform_facts

    cpu = platform_facts().get("cpu") or {}
    gpus = gpu_facts().get("gpus") or []
    return {"node_id": node_id, "hostname": socket.gethostname(), "machine": platform.machine(),
            "cpu": cpu.get("model"), "gpus": [g.get("name") for g in gpus]}


def worker_facts(session: ModelSession, validation: Validation | None, node: Mapping[str, Any],
                 *, validated: bool) -> dict[str, Any]:
    """One worker's provenance: its node, the environment it ran in, the probe verdict there."""
    resolved = session.resolved
    assert resolved is not None
    return {**node, "pid": os.getpid(), "strategy": resolved.strategy, "python": str(resolved.python),
            "env_key": resolved.env_path.name if resolved.env_path else None,
            "built": resolved.built, "lock_sha256": lock_sha256(session),
            "probe": validation.status if validation is not None else "not_run",
            "probe_max_abs_diff": max((o.max_abs_diff for o in validation.outputs), default=0.0)
            if validation is not None else None,
            "validated": validated}


def probe_refusal(validation: Validation, node: Mapping[str, Any], model: Path) -> MismatchError:
    worst = max(validation.outputs, key=lambda c: c.max_abs_diff)
    where = f"node {node.get('node_id')} ({node.get('hostname')})" if node.get("node_id") else "this machine"
    return MismatchError(
        f"predictions on {where} do not match the lock: output {worst.name} differs by up to "
        f"{worst.max_abs_diff:.3g} ({worst.share_out_of_tolerance:.1%} of elements out of tolerance)",
        hint=f"`envlock check {model}` on that node explains why; --no-validate runs anyway")


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def provenance_doc(model: Path, shard_input: str, rows: int, output: str, facts: Mapping[str, Any],
                   outputs: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
    return {"schema": PROVENANCE_SCHEMA, "model": str(model), "input": shard_input, "output": output,
            "rows": rows, "batch_size": batch_size, "outputs": list(outputs), "worker": dict(facts),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_provenance(path: Path, doc: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


# -- one worker's part: validate once, then shard after shard --------------------------------------

class ShardWorker:
    """A ModelSession that proves the probe before its first shard and predicts whole shards.

    Used by the CLI on this machine and by every Ray actor on its node.
    """

    def __init__(self, session: ModelSession, *, validate: bool, batch_size: int,
                 node_id: str | None = None) -> None:
        self.session = session
        self.validate = validate
        self.batch_size = batch_size
        self.node = node_facts(node_id)
        self.facts: dict[str, Any] = {}
        self._scratch = Path(tempfile.mkdtemp(prefix="envlock-shards-"))

    def open(self) -> dict[str, Any]:
        """Build or reuse the environment, start the worker, replay the probe on this node.

        The probe is replayed even with --no-validate: the verdict goes into the provenance."""
        self.session.open()
        validation = self.session.validate()
        self.facts = worker_facts(self.session, validation, self.node, validated=self.validate)
        from envlock.diagnosis.compare import MISMATCH

        if self.validate and validation.status == MISMATCH:
            raise probe_refusal(validation, self.node, self.session.model)
        return self.facts

    def close(self) -> None:
        self.session.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def predict_shard(self, shard: Shard, output: Path, *,
                      on_progress: RowsDone | None = None) -> dict[str, Any]:
        """Predict one shard into ``output`` (renamed into place). Returns the worker's metadata."""
        inp = worker_input(shard, self.session.specs, self._scratch)
        try:
            return self.session.predict_file(inp, output, batch_size=self.batch_size,
                                             on_progress=on_progress)
        finally:
            if inp != shard.path:
                inp.unlink(missing_ok=True)


def run_shards(model: str | os.PathLike[str], input_arg: str, output: Path | None, *,
               batch_size: int = 32, validate: bool = True, on_shard: ShardDone | None = None,
               on_rows: RowsDone | None = None, on_start: Callable[[list[Shard]], None] | None = None,
               **session_kwargs: Any) -> ShardRunResult:
    """Every shard on this machine, one after another, through one worker (bounded memory)."""
    from envlock.commands.run import ModelSession

    t0 = time.perf_counter()
    if batch_size < 1:
        raise BadInputError("--batch-size must be at least 1")
    session = ModelSession(model, **session_kwargs)
    worker = ShardWorker(session, validate=validate, batch_size=batch_size)
    try:
        paths = find_shards(input_arg)
        shards = inspect_shards(paths, session.specs)  # exit 2 before any environment is built
        outdir = prepare_output_dir(output, paths)
        n_outputs = len(session.sidecar.manifest["model"].get("outputs") or [1])
        facts = worker.open()
        if on_start is not None:  # after the worker's own stages: one live display at a time
            on_start(shards)
        total = sum(s.rows for s in shards)
        done_rows = 0
        results = []
        for shard in shards:
            out = outdir / output_name(shard.stem, n_outputs)
            prov = outdir / f"{shard.stem}{PROVENANCE_SUFFIX}"
            t = time.perf_counter()

            def rows_done(done: int, _total: int, base: int = done_rows) -> None:
                if on_rows is not None:
                    on_rows(base + done, total)

            # The output goes to a scratch name first: its provenance must exist before it does.
            outdir.mkdir(exist_ok=True)
            staged = outdir / f".{out.name}.staged{out.suffix}"
            try:
                meta = worker.predict_shard(shard, staged, on_progress=rows_done)
                write_provenance(prov, provenance_doc(session.model, str(shard.path), shard.rows, str(out),
                                                      facts, meta["outputs"], batch_size))
                os.replace(staged, out)
            finally:
                staged.unlink(missing_ok=True)
            done_rows += shard.rows
            result = ShardResult(shard.path, out, prov, shard.rows, time.perf_counter() - t,
                                 {"node_id": None, "hostname": facts["hostname"]})
            results.append(result)
            if on_shard is not None:
                on_shard(result)
        return ShardRunResult(session.model, input_arg, outdir, total, tuple(results), (facts,),
                              facts["lock_sha256"], None, time.perf_counter() - t0)
    finally:
        worker.close()
