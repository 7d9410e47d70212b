"""The command line: parse arguments, call the core, render what comes back.

Nothing in the core prints or exits; this module maps EnvlockError subclasses to the exit
codes of DESIGN section 1 and prints one line (plus one line of advice) per failure. A
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

import envlock
from envlock.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_TERMINATED,
    EXIT_WORKER,
    BadInputError,
    EnvlockError,
    Terminated,
)

ERROR_SCHEMA = "envlock.error/1"
# Longer messages (a resolver's explanation, a list of 200 packages) are cut; --debug shows all.
MAX_MESSAGE = 400


class UsageError(BadInputError):
    """What argparse refuses: reported like every other error (one line, --json document)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's usage dump is long: one line, the documented exit code, a pointer to --help.
        hint = f"see `{self.prog} --help`" if " " in self.prog else None
        raise UsageError(message, hint=hint)


# -- argument types: refused at parse time, exit 2 ---------------------------------------

def _path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL byte")
    return Path(text)


def _model(text: str) -> str:
    return str(_path(text))


def _interpreter(text: str) -> str:
    """--python: an executable file, by path or by name on PATH."""
    import shutil

    path = _path(text)
    found = str(path) if os.sep in text or path.exists() else shutil.which(text)
    if found is None or not Path(found).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such interpreter")
    if Path(found).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder, not an interpreter")
    if not os.access(found, os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: not executable")
    return found


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _ranged(kind: Callable[[str], float], low: float, high: float | None = None, *,
            low_open: bool = False, what: str = "") -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = (f"greater than {low:g}" if low_open else f"at least {low:g}") + (
                f" and at most {high:.15g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{what or 'the value'} must be {bound}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


_TOLERANCE = _ranged(_number, 0.0, what="a tolerance")
_SECONDS = _ranged(_number, 0.0, low_open=True, what="a timeout")
_BATCH = _ranged(_integer, 1, 2**31 - 1, what="a batch size")
_SEED = _ranged(_integer, 0, 2**32 - 1, what="a seed")
_DAYS = _ranged(_number, 0.0, 36500.0, what="an age in days")
_GIGABYTES = _ranged(_number, 0.0, 1e9, what="a size in GB")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no human output, only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="envlock", description=envlock.__doc__)
    parser.add_argument("--version", action="version", version=f"envlock {envlock.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("save", help="capture the environment and reference predictions of a saved model")
    p.add_argument("model", type=_model, help="a .keras file, a legacy .h5 file or a SavedModel directory")
    p.add_argument("--probe", type=_path, help="real inputs (.npy, or .npz with one array per input)")
    p.add_argument("--custom-objects", action="append", default=[], metavar="MODULE",
                   help="import MODULE before loading (repeatable)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="save even if the weights loaded back differ (weights_not_restored)")
    p.add_argument("--atol", type=_TOLERANCE, default=1e-6)
    p.add_argument("--rtol", type=_TOLERANCE, default=1e-5)
    p.add_argument("--seed", type=_SEED, default=0, help="seed of generated probe inputs")
    p.add_argument("--vendor", action="store_true",
                   help="copy every locked wheel into MODEL.envlock/wheels: a rebuild needs no index")
    _common(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("show", help="the manifest, readable")
    p.add_argument("model", type=_model)
    _common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="validate on this machine, then predict inside the locked environment")
    p.add_argument("model", type=_model)
    p.add_argument("--input", "-i", type=_path, required=True,
                   help=".npy (one input) or .npz (by input name)")
    p.add_argument("--output", "-o", type=_path,
                   help="default: INPUT.predictions.npy (.npz for several outputs)")
    p.add_argument("--batch-size", type=_BATCH, default=32, help="Keras' default, for the same bits")
    _session_args(p)
    p.add_argument("--no-validate", action="store_true", help="predict even if the probe does not match")
    # Sharded input (a folder, a glob or Parquet): --output is a folder, one output per shard.
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the shards on a Ray cluster: ADDRESS, else $RAY_ADDRESS, else a local one")
    p.add_argument("--actors", type=int, help="Ray actors (default: one per CPU of the cluster, at most "
                   "one per shard)")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="replay the probe on this machine and explain every difference")
    p.add_argument("model", type=_model)
    p.add_argument("--atol", type=_TOLERANCE, help="absolute tolerance (default: as recorded at save)")
    p.add_argument("--rtol", type=_TOLERANCE, help="relative tolerance (default: as recorded at save)")
    _session_args(p)
    _common(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("diff", help="the lock against this (or --python's) environment")
    p.add_argument("model", type=_model)
    p.add_argument("--python", type=_interpreter,
                   help="the interpreter whose environment to compare (default: this one)")
    _common(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("env", help="build (or find) the locked environment and print its path")
    p.add_argument("model", type=_model)
    p.add_argument("--strategy", choices=["auto", "current", "venv", "conda"],
                   help="default: conda when the sidecar holds a conda-lock.yml, else venv")
    p.add_argument("--allow-python-download", action="store_true")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR", type=_model)
    _custom_objects_arg(p)
    _common(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("export", help="render the lock for another tool (a Dockerfile, a requirements file)")
    p.add_argument("model", type=_model)
    p.add_argument("--format", "-f", required=True, metavar="FORMAT",
                   help="dockerfile, requirements, ... (see envlock.exporting.FORMATS)")
    p.add_argument("--output", "-o", type=_path, help="write here (default: stdout)")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cache", help="the environment cache")
    csub = p.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    q = csub.add_parser("list", help="cached environments")
    _common(q)
    q.set_defaults(func=cmd_cache_list)
    q = csub.add_parser("gc", help="remove environments by age of last use and by total size")
    q.add_argument("--older-than", type=_DAYS, metavar="DAYS", help="remove those unused for DAYS")
    q.add_argument("--max-size", type=_GIGABYTES, metavar="GB", help="then remove the oldest until under GB")
    _common(q)
    q.set_defaults(func=cmd_cache_gc)
    return parser


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="auto", choices=["auto", "current", "venv", "conda"],
                   help="auto: this interpreter if it matches the lock exactly, else the cached venv")
    p.add_argument("--no-recorded-env", action="store_true",
                   help="use this shell's TF_* / PYTHONHASHSEED values instead of the recorded ones")
    p.add_argument("--trust-code", action="store_true", help="trust the sidecar's code/ (remembered)")
    p.add_argument("--unsafe", action="store_true", help="load with Keras safe_mode off (lambdas)")
    p.add_argument("--timeout", type=_SECONDS, help="seconds the worker may take for one step")
    p.add_argument("--allow-python-download", action="store_true",
                   help="let uv download the recorded Python if none is installed")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR", type=_model,
                   help="extra folder of wheels (e.g. for packages gone from the index)")
    _custom_objects_arg(p)


def _custom_objects_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-objects", action="append", default=[], metavar="MODULE",
                   help="import MODULE before loading (repeatable); those given at save are "
                        "imported anyway")


def _session_kwargs(args: argparse.Namespace, out: Out) -> dict[str, Any]:
    return {
        "strategy": args.strategy, "use_recorded_env": not args.no_recorded_env,
        "trust_code": args.trust_code, "unsafe": args.unsafe, "timeout": args.timeout,
        "allow_python_download": args.allow_python_download,
        "find_links": tuple(str(Path(f).resolve()) for f in args.find_links),
        "on_stage": out.stage, "on_build_event": out.build_event,
        "custom_objects": tuple(args.custom_objects),
    }


# -- rendering ---------------------------------------------------------------------------

class Out:
    """Where human output goes (stderr for progress, stdout for results), honouring --quiet."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False)) or self.json
        self.console = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self._status: Any = None

    def print(self, *objs: Any) -> None:
        self.done()
        if not self.quiet:
            self.console.print(*objs)

    def stage(self, text: str) -> None:
        # Progress is for a person watching: a transient status line on a terminal, nothing
        # in a pipe or a log (where only results and errors belong), like pip and uv.
        logging.getLogger("envlock").info(text)
        if self.quiet or not self.err.is_terminal:
            return
        if self._status is None:
            self._status = self.err.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def done(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def build_event(self, event: Any) -> None:
        if event.stage != "output":
            self.stage(event.message)

    def progress(self, total_hint: str) -> Any:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(total_hint), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=self.err, transient=True,
                        # Off a terminal a transient bar leaves only a blank line on stderr.
                        disable=self.quiet or not self.err.is_terminal)

    def emit_json(self, doc: dict[str, Any]) -> None:
        self.done()
        sys.stdout.write(json.dumps(_finite(doc), indent=2, sort_keys=True, default=str) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no Infinity or NaN: a value that is not finite is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def cmd_save(args: argparse.Namespace, out: Out) -> int:
    from envlock.saving import SaveOptions, lock

    command = "envlock save " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "envlock save"
    opts = SaveOptions(probe=args.probe, custom_object_modules=tuple(args.custom_objects),
                       allow_mismatch=args.allow_mismatch, atol=args.atol, rtol=args.rtol,
                       seed=args.seed, command=command, vendor=args.vendor)
    result = lock(args.model, options=opts, on_stage=out.stage)
    if out.json:
        out.emit_json(result.to_json())
        return 0
    out.print(f"[bold green]saved[/] {result.sidecar}")
    out.print(f"  packages   {result.packages} locked, {result.hashed} with sha256"
              + (f", {len(result.missing_hashes)} without" if result.missing_hashes else ""))
    out.print(f"  weights    {result.weights_overall[:16]}… "
              + ("restored" if result.weights_restored else "[red]NOT restored[/]"))
    for c in result.custom_objects:
        where = c.get("vendored") or ("site-packages" if c.get("in_site_packages") else "-")
        out.print(f"  custom     {c['module']}.{c['qualname']} → {where}")
    shapes = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in result.probe_inputs)
    out.print(f"  probe      {shapes}; repeat bitwise equal: {result.probe_repeatable}")
    if args.vendor:
        wheels = result.sidecar / "wheels"
        count = sum(1 for _ in wheels.iterdir()) if wheels.is_dir() else 0
        out.print(f"  wheels     {count} file(s) in {wheels}: rebuilds need no index")
    for w in result.warnings:
        out.err.print(f"[yellow]warning:[/] {w}")
    return 0


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    from envlock.inspecting import show

    result = show(args.model)
    if out.json:
        out.emit_json(result.to_json())
        return 0
    m = result.manifest
    t = Table(title=f"{result.sidecar}", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    model = m["model"]
    t.add_row("model", f"{model['file']} ({model['format']}, {_keras_of(m)}), "
                       f"sha256 {model['sha256'][:16]}…")
    t.add_row("inputs", ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in model.get("inputs", [])))
    sampled = set((m.get("probe") or {}).get("varying_outputs") or [])
    t.add_row("outputs", ", ".join(f"{o['name']} {o['shape']} {o['dtype']}"
                                   + (" (sampled at inference)" if o["name"] in sampled else "")
                                   for o in model.get("outputs", [])) or "not recorded")
    t.add_row("saved", f"{m['created']} by envlock {m['envlock_version']}: {m['command']}")
    py = m["python"]
    t.add_row("python", f"{py.get('implementation')} {py.get('version')} ({py.get('abi')})")
    plat = m["platform"]
    cpu = plat.get("cpu") or {}
    t.add_row("platform", f"{plat.get('os')} {plat.get('machine')}, {cpu.get('model')}")
    fw = m["framework"]
    t.add_row("framework", ", ".join(f"{k} {v}" for k, v in sorted(fw.get("versions", {}).items()))
              + f"; backend {fw.get('backend')}")
    cuda = m["cuda"]
    t.add_row("cuda", f"CUDA {cuda.get('cuda_version')}, cuDNN {cuda.get('cudnn_version')}"
              if cuda.get("is_cuda_build") else "CPU-only build")
    gpus = (m.get("gpu") or {}).get("gpus") or []
    t.add_row("gpu", ", ".join(g.get("name", "?") for g in gpus) or "none")
    d = m["determinism"]
    t.add_row("determinism", f"oneDNN {d.get('onednn', {}).get('effective')}, op determinism "
              f"{d.get('op_determinism')}, TF32 {d.get('tf32')}, threads {d.get('intra_op_threads')}/"
              f"{d.get('inter_op_threads')}, jit {d.get('jit')!r}, policy {d.get('dtype_policy')}")
    pk = m["packages"]
    t.add_row("packages", f"{pk['count']} locked, {pk['hashed']} hashed"
              + (f"; not locked: {', '.join(r['name'] for r in pk['risks'])}" if pk["risks"] else ""))
    conda = m.get("conda")
    if conda:
        py = conda.get("python") or {}
        t.add_row("conda", f"{conda.get('platform')}, {conda.get('conda_packages')} conda and "
                  f"{conda.get('pip_packages')} pip packages"
                  f"{', python ' + str(py.get('version')) if py else ''}; channels "
                  + ", ".join(str(c) for c in conda.get("channels") or []))
    for c in m.get("custom_objects", []):
        t.add_row("custom", f"{c['module']}.{c['qualname']} (source {str(c.get('source_sha256'))[:12]}…)"
                  + (f" → {c['vendored']}" if c.get("vendored") else ""))
    for r in m.get("custom_object_modules", []):
        dist = r.get("distribution") or {}
        where = r.get("vendored") or (f"{dist.get('name')} {dist.get('version')}" if dist else "installed")
        t.add_row("module", f"{r['module']} ({r.get('reason')}) → {where}")
    w = m["weights"]
    t.add_row("weights", f"{len(w['variables'])} variables, {w['overall'][:16]}…")
    pr = m["probe"]
    t.add_row("probe", f"{pr['source']}, " + ", ".join(f"{i['name']}{tuple(i['shape'])}"
                                                       for i in pr["inputs"])
              + f"; repeat bitwise equal {pr['repeat_bitwise_equal']}; atol {pr['tolerance']['atol']}"
              f" rtol {pr['tolerance']['rtol']}")
    out.print(t)
    for warning in m.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}")
    return 0


def _keras_of(m: dict[str, Any]) -> str:
    """The Keras version the file records; else the environment's, said to be that."""
    version = m["model"].get("keras_version")
    if version:
        return f"Keras {version}"
    fw = (m.get("framework") or {}).get("versions") or {}
    env = fw.get("tf_keras") or fw.get("keras")
    return f"Keras {env} in the environment, the file records none" if env else "Keras version not recorded"


def cmd_run(args: argparse.Namespace, out: Out) -> int:
    from envlock.running import run
    from envlock.shards import is_sharded

    if args.ray is not None or is_sharded(str(args.input)):
        return _run_shards(args, out)
    bar = out.progress("predicting")
    task = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            out.done()  # one live display at a time: the status line gives way to the bar
            bar.start()
            task = bar.add_task("predict", total=total)
        bar.update(task, completed=done)

    try:
        result = run(args.model, args.input, output=args.output, batch_size=args.batch_size,
                     validate=not args.no_validate, on_progress=on_progress, **_session_kwargs(args, out))
    finally:
        bar.stop()
    if result.nonfinite_rows:
        # Predicted all the same (Keras would), but a NaN in is usually a bug upstream.
        out.err.print(f"[yellow]warning:[/] {result.nonfinite_rows} of {result.rows} input row(s) "
                      "hold NaN or infinite values; their predictions are likely NaN too")
    if out.json:
        out.emit_json(result.to_json())
        return 0
    v = result.validation
    if v is not None and not result.sampled_outputs:
        out.print(f"[green]probe {v.status.replace('_', ' ')}[/] on this machine")
    if result.note:
        out.print(f"[yellow]not reproducible bit for bit:[/] {result.note}")
    where = f"{result.strategy}" + (f" {result.env_path}" if result.env_path else f" {result.python}")
    out.print(f"[bold green]wrote[/] {result.output} ({result.rows} rows) using {where}")
    return 0


def _run_shards(args: argparse.Namespace, out: Out) -> int:
    """`envlock run` over shards: here one after another, or on Ray with --ray."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from envlock.errors import BadInputError
    from envlock.shards import run_shards

    if args.actors is not None and args.ray is None:
        raise BadInputError("--actors needs --ray")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=out.err, transient=True,
                   disable=out.quiet or not out.err.is_terminal)
    tasks: dict[str, Any] = {}

    def on_start(shards: Sequence[Any]) -> None:
        out.done()
        bar.start()
        tasks["shards"] = bar.add_task("shards", total=len(shards))
        tasks["rows"] = bar.add_task("rows", total=sum(s.rows for s in shards))

    def on_rows(done: int, total: int) -> None:
        bar.update(tasks["rows"], completed=done)

    def on_shard(result: Any) -> None:
        bar.advance(tasks["shards"])
        if args.ray is not None:
            bar.advance(tasks["rows"], result.rows)

    def on_node(facts: Any) -> None:
        if not bar.disable:  # live status for a person watching; the summary says it for good
            bar.console.print(_node_line(facts))

    def on_status(event: Any) -> None:  # a node's step while it prepares: building, waiting, ...
        if not bar.disable:
            steps = {"preparing": "preparing the locked environment", "building": "building the environment",
                     "waiting": "waiting for the environment another actor builds"}
            bar.console.print(f"node {str(event.get('node_id'))[:12]} ({event.get('hostname')}, "
                              f"pid {event.get('pid')}): {steps.get(event.get('event'), event.get('event'))}")

    kwargs = _session_kwargs(args, out)
    common = {"batch_size": args.batch_size, "validate": not args.no_validate, "on_start": on_start,
              "on_shard": on_shard}
    try:
        if args.ray is not None:
            import time

            from envlock.raydriver import run_shards_on_ray, stderr_to
            from envlock.settings import Settings

            stamp = time.strftime("%Y%m%d-%H%M%S")
            log = Settings.from_env().home / "logs" / f"ray-{stamp}-{os.getpid()}.log"
            with stderr_to(log) as real_stderr:
                out.err.file = real_stderr
                try:
                    result = run_shards_on_ray(args.model, str(args.input), args.output,
                                               address=args.ray or None, actors=args.actors, on_node=on_node,
                                               on_status=on_status,
                                               **common, **kwargs)
                finally:
                    bar.stop()
                    out.err.file = sys.stderr
        else:
            result = run_shards(args.model, str(args.input), args.output, on_rows=on_rows, **common,
                                **kwargs)
    finally:
        bar.stop()
    if out.json:
        out.emit_json(result.to_json())
        return 0
    lines: dict[str, int] = {}  # the actors of one node usually say the same: once, counted
    for facts in result.nodes:
        lines[_node_line(facts)] = lines.get(_node_line(facts), 0) + 1
    for line, count in lines.items():
        out.print(line + (f" ({count} actors)" if count > 1 else ""))
    on_ray = f" on Ray ({result.ray_address}, {len(result.nodes)} actor(s))" if result.ray_address else ""
    out.print(f"[bold green]wrote[/] {len(result.shards)} shard(s), {result.rows} rows, "
              f"to {result.output_dir}{on_ray}")
    return 0


def _node_line(facts: Any) -> str:
    where = f"node {facts['node_id'][:12]}" if facts.get("node_id") else "this machine"
    if facts.get("error"):
        return f"{where} ({facts.get('hostname')}): [red]failed[/] ({facts['error']['class']})"
    env = "built" if facts.get("built") else "reused" if facts.get("strategy") != "current" else "is this one"
    colour = "green" if facts.get("probe") != "mismatch" else "red"
    return (f"{where} ({facts.get('hostname')}, {facts.get('cpu')}): environment {env} "
            f"({facts.get('strategy')}), probe [{colour}]{str(facts.get('probe')).replace('_', ' ')}[/]")


def _findings_table(findings: Sequence[Any]) -> Table:
    t = Table("#", "cause", "recorded", "here", "fix", show_lines=False)
    for f in findings:
        t.add_row(str(f.rank), f"[bold]{f.code}[/]\n{f.summary}", _short(f.recorded),
                  _short(f.current), f.fix)
    return t


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def cmd_check(args: argparse.Namespace, out: Out) -> int:
    from envlock.checking import check

    result = check(args.model, atol=args.atol, rtol=args.rtol, **_session_kwargs(args, out))
    # A model that does not load is a worker failure (exit 4), with the report all the same.
    code = 0 if result.ok else EXIT_WORKER if result.status == "error" else EXIT_MISMATCH
    if out.json:
        out.emit_json(result.to_json())
        return code
    colour = "green" if result.ok else "red"
    out.print(f"[bold {colour}]{result.status.replace('_', ' ')}[/] "
              f"(atol {result.tolerance['atol']}, rtol {result.tolerance['rtol']}) "
              f"using {result.strategy} {result.python}")
    if result.error:
        out.print(f"[red]{result.error}[/]")
    if result.outputs:
        t = Table("output", "status", "max abs", "max rel", "out of tol", "worst at")
        for o in result.outputs:
            t.add_row(o.name, o.status, f"{o.max_abs_diff:.3g}", f"{o.max_rel_diff:.3g}",
                      f"{o.share_out_of_tolerance:.2%}", str(o.worst_index or "-"))
        out.print(t)
        for o in result.outputs:
            if o.note:
                out.print(f"output {o.name}: {o.note}")
    if result.findings:
        out.print(_findings_table(result.findings))
    elif result.ok:
        out.print("no differences from the lock")
    for note in result.notes:
        out.print(f"note: {note['what']}")
        for name, values in (note.get("variables") or note.get("packages") or {}).items():
            out.print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return code


def cmd_diff(args: argparse.Namespace, out: Out) -> int:
    from envlock.differ import diff

    result = diff(args.model, python=args.python)
    if out.json:
        out.emit_json(result.to_json())
        return 0
    if result.packages:
        t = Table("package", "change", "recorded", "here", "matters")
        for p in result.packages:
            t.add_row(p.name, p.kind, p.recorded or "-", p.current or "-", "yes" if p.matters else "")
        out.print(t)
    if result.findings:
        out.print(_findings_table(result.findings))
    if result.framework_error:
        out.print(f"[yellow]framework not readable in {result.python}:[/] {result.framework_error}")
    if not result.differences:
        out.print(f"no differences between the lock and {result.python}")
    return 0


def cmd_env(args: argparse.Namespace, out: Out) -> int:
    from envlock.running import import_modules, resolve_environment
    from envlock.settings import Settings
    from envlock.sidecar import read_sidecar

    sc = read_sidecar(args.model)
    strategy = args.strategy or ("conda" if sc.file("conda-lock.yml").is_file() else "venv")
    resolved = resolve_environment(sc, settings=Settings.from_env(), strategy=strategy,
                                   allow_python_download=args.allow_python_download,
                                   find_links=tuple(args.find_links), on_event=out.build_event)
    imported = import_modules(sc, resolved, tuple(args.custom_objects), settings=Settings.from_env())
    if out.json:
        out.emit_json({"schema": "envlock.env/1", "strategy": resolved.strategy,
                       "path": str(resolved.env_path) if resolved.env_path else None,
                       "python": str(resolved.python), "built": resolved.built,
                       "custom_objects": imported})
        return 0
    sys.stdout.write(f"{resolved.env_path or Path(resolved.python).parent.parent}\n")
    return 0


def cmd_export(args: argparse.Namespace, out: Out) -> int:
    from envlock.exporting import export

    result = export(args.model, args.format, output=args.output)
    if out.json:
        out.emit_json(result.to_json())
    elif result.output is None:
        sys.stdout.write(result.text)  # as is: no markup, wrapping or colour
    else:
        out.print(f"[bold green]wrote[/] {result.output} ({result.format})")
    return 0


def cmd_cache_list(args: argparse.Namespace, out: Out) -> int:
    from envlock.envcache import EnvCache
    from envlock.settings import Settings

    infos = EnvCache(Settings.from_env()).list()
    if out.json:
        out.emit_json({"schema": "envlock.cache.list/1", "environments": [
            {"key": i.key, "path": str(i.path), "python": i.python_version, "installer": i.installer,
             "created": i.created.isoformat(), "last_used": i.last_used.isoformat(), "size": i.size}
            for i in infos]})
        return 0
    t = Table("key", "python", "installer", "last used", "size")
    for i in infos:
        t.add_row(i.key[:16], i.python_version, i.installer, i.last_used.strftime("%Y-%m-%d %H:%M"),
                  f"{i.size / 1e6:.0f} MB")
    out.print(t if infos else "no cached environments")
    return 0


def cmd_cache_gc(args: argparse.Namespace, out: Out) -> int:
    from datetime import timedelta

    from envlock.envcache import EnvCache
    from envlock.settings import Settings

    removed = EnvCache(Settings.from_env()).gc(
        older_than=timedelta(days=args.older_than) if args.older_than is not None else None,
        max_total_bytes=int(args.max_size * 1e9) if args.max_size is not None else None)
    if out.json:
        out.emit_json({"schema": "envlock.cache.gc/1", "removed": [
            {"key": r.key, "path": str(r.path), "reason": r.reason, "size": r.size} for r in removed]})
        return 0
    for r in removed:
        out.print(f"removed {r.key[:16]} ({r.reason}, {r.size / 1e6:.0f} MB)")
    out.print(f"{len(removed)} removed")
    return 0


def _one_line(text: str) -> str:
    """A message as one readable line: newlines folded, a very long one cut."""
    line = " ".join(text.split())
    if len(line) > MAX_MESSAGE:
        rest = len(line) - MAX_MESSAGE
        line = line[:MAX_MESSAGE - 1].rstrip() + f"… ({rest} more characters; --debug shows all)"
    return line


def _error_document(code: int, message: str, hint: str | None, cause: str | None,
                    kind: str) -> dict[str, Any]:
    return {"schema": ERROR_SCHEMA, "exit_code": code, "error": kind, "message": message,
            "hint": hint, "cause": cause}


def _report(code: int, message: str, *, hint: str | None = None, cause: str | None = None,
            kind: str = "EnvlockError", as_json: bool = False, debug: bool = False,
            full: str | None = None) -> int:
    """The one way a failure reaches the user: one `envlock: error:` line (+ one hint line)."""
    if debug:
        if sys.exc_info()[0] is not None:
            traceback.print_exc()
        if full and full != message:
            sys.stderr.write(full.rstrip() + "\n")
    line = _one_line(message)
    sys.stderr.write(f"envlock: error: {line}\n")
    if hint:
        sys.stderr.write(f"  hint: {_one_line(hint)}\n")
    if as_json:
        doc = _error_document(code, line, _one_line(hint) if hint else None, cause, kind)
        try:
            sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            sys.stdout.flush()
        except OSError:
            pass
    return code


def _report_error(err: EnvlockError, debug: bool, *, as_json: bool = False) -> int:
    log_tail = getattr(err, "log_tail", "") if debug else ""
    # err.message, not str(err): str() adds the hint for API users; here it has a line of its own.
    full = (err.message + "\n" + log_tail) if log_tail else err.message
    return _report(err.exit_code, err.message, hint=err.hint, cause=err.cause, kind=type(err).__name__,
                   as_json=as_json, debug=debug, full=full)


def _os_error_code(exc: OSError) -> int:
    """2 for the user's files; 3 for envlock's own cache (ENVLOCK_HOME), where the fix differs."""
    from envlock.settings import Settings

    try:
        home = os.path.realpath(Settings.from_env().home)
    except EnvlockError:
        return EXIT_BAD_INPUT
    for name in (exc.filename, exc.filename2):
        if name is not None and os.path.realpath(os.fsdecode(name)).startswith(home.rstrip(os.sep) + os.sep):
            return EXIT_ENVIRONMENT
    return EXIT_BAD_INPUT


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGTERM becomes Terminated (a KeyboardInterrupt), so the cleanup that Ctrl-C runs
    (worker stopped, temporary files removed, no partial output) runs for it too. After the
    first signal the next ones are ignored: the cleanup itself must not be cut short."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (main() called from a thread): leave them alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing succeeds, so that a usage error is a JSON document too.
    as_json = "--json" in raw[: raw.index("--")] if "--" in raw else "--json" in raw
    debug = "--debug" in raw
    out: Out | None = None
    with _signals_as_exceptions():
        try:
            parser = build_parser()
            args = parser.parse_args(raw)
            logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                                format="%(name)s: %(message)s")
            out = Out(args)
            func: Callable[[argparse.Namespace, Out], int] = args.func
            return func(args, out)
        except EnvlockError as err:
            _stop(out)
            return _report_error(err, debug, as_json=as_json)
        except Terminated:
            _stop(out)
            return _report(EXIT_TERMINATED, "terminated (SIGTERM); nothing was left half-written",
                           kind="Terminated", as_json=as_json)
        except KeyboardInterrupt:
            _stop(out)
            return _report(EXIT_INTERRUPTED, "interrupted; nothing was left half-written",
                           kind="KeyboardInterrupt", as_json=as_json)
        except BrokenPipeError:
            # `envlock show x | head`: stdout closed early is not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (RecursionError, MemoryError) as exc:
            _stop(out)
            return _report(EXIT_BAD_INPUT,
                           f"input too deeply nested or too large to read ({type(exc).__name__})",
                           kind=type(exc).__name__, as_json=as_json, debug=debug)
        except OSError as exc:
            from envlock.fs import describe_os_error

            _stop(out)
            return _report(_os_error_code(exc), describe_os_error(exc), kind=type(exc).__name__,
                           as_json=as_json, debug=debug)
        except Exception as exc:
            _stop(out)
            return _report(EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {exc})",
                           hint="this is a bug in envlock: rerun with --debug and report the traceback",
                           kind="InternalError", as_json=as_json, debug=debug)


def _stop(out: Out | None) -> None:
    if out is not None:
        out.done()


if __name__ == "__main__":
    sys.exit(main())
