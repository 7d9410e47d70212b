# PYTHON_ARGCOMPLETE_OK (argcomplete looks for this mark: `register-python-argcomplete envlock`)
"""The command line: parse arguments (cliparse), call the core, render what comes back (clirender).

Nothing in the core prints or exits; this module maps EnvlockError subclasses to the exit
codes of DESIGN section 1 and prints one line (plus one line of advice) per failure. A
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from envlock.cli.parse import Handler, UsageError, build_parser
from envlock.cli.render import (
    Out,
    node_line,
    render_cache_gc,
    render_cache_list,
    render_check,
    render_diff,
    render_env,
    render_export,
    render_run,
    render_save,
    render_shards,
    render_show,
    warn_nonfinite,
)
from envlock.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_TERMINATED,
    EXIT_WORKER,
    EnvlockError,
    Terminated,
)

__all__ = ["UsageError", "main"]

ERROR_SCHEMA = "envlock.error/1"
# Longer messages (a resolver's explanation, a list of 200 packages) are cut; --debug shows all.
MAX_MESSAGE = 400


def _session_kwargs(args: argparse.Namespace, out: Out) -> dict[str, Any]:
    return {
        "strategy": args.strategy, "use_recorded_env": not args.no_recorded_env,
        "trust_code": args.trust_code, "unsafe": args.unsafe, "timeout": args.timeout,
        "allow_python_download": args.allow_python_download,
        "find_links": tuple(str(Path(f).resolve()) for f in args.find_links),
        "on_stage": out.stage, "on_build_event": out.build_event,
        "custom_objects": tuple(args.custom_objects),
    }


def _emit(result: Any, out: Out, render: Callable[[Any, Out], None]) -> None:
    """The one fork between the two outputs: the result's JSON document, or its human rendering."""
    if out.json:
        out.emit_json(result.to_json())
    else:
        render(result, out)


def cmd_save(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.save import SaveOptions, lock

    # What the user typed, as main received it (not sys.argv: main may be called with its own).
    command = shlex.join(["envlock", *args.argv])
    opts = SaveOptions(probe=args.probe, custom_object_modules=tuple(args.custom_objects),
                       allow_mismatch=args.allow_mismatch, atol=args.atol, rtol=args.rtol,
                       seed=args.seed, command=command, vendor=args.vendor)
    result = lock(args.model, options=opts, on_stage=out.stage)
    _emit(result, out, lambda r, o: render_save(r, o, vendor=args.vendor))
    return 0


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.show import show

    _emit(show(args.model), out, render_show)
    return 0


def cmd_run(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.run import run
    from envlock.commands.shards import is_sharded

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
    warn_nonfinite(result, out)
    _emit(result, out, render_run)
    return 0


def _run_shards(args: argparse.Namespace, out: Out) -> int:
    """`envlock run` over shards: here one after another, or on Ray with --ray."""
    from envlock.commands.shards import run_shards
    from envlock.errors import BadInputError

    if args.actors is not None and args.ray is None:
        raise BadInputError("--actors needs --ray")
    bars = _ShardBars(out, on_ray=args.ray is not None)
    kwargs = _session_kwargs(args, out)
    common = {"batch_size": args.batch_size, "validate": not args.no_validate, "on_start": bars.on_start,
              "on_shard": bars.on_shard}
    try:
        if args.ray is not None:
            result = _run_shards_on_ray(args, out, bars, common, kwargs)
        else:
            result = run_shards(args.model, str(args.input), args.output, on_rows=bars.on_rows, **common,
                                **kwargs)
    finally:
        bars.bar.stop()
    _emit(result, out, render_shards)
    return 0


def _run_shards_on_ray(args: argparse.Namespace, out: Out, bars: _ShardBars, common: dict[str, Any],
                       kwargs: dict[str, Any]) -> Any:
    """The shards on Ray, with Ray's own lines sent to a log under ENVLOCK_HOME."""
    import time

    from envlock.commands.raydriver import run_shards_on_ray, stderr_to
    from envlock.settings import Settings

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = Settings.from_env().home / "logs" / f"ray-{stamp}-{os.getpid()}.log"
    with stderr_to(log) as real_stderr:
        out.err.file = real_stderr
        try:
            return run_shards_on_ray(args.model, str(args.input), args.output,
                                     address=args.ray or None, actors=args.actors, on_node=bars.on_node,
                                     on_status=bars.on_status,
                                     **common, **kwargs)
        finally:
            bars.bar.stop()
            out.err.file = sys.stderr


class _ShardBars:
    """The progress of a sharded run: a bar over shards, one over rows, and on Ray a line for
    each step and verdict of a node."""

    def __init__(self, out: Out, *, on_ray: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.out = out
        self.on_ray = on_ray
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=out.err, transient=True,
                            disable=out.quiet or not out.err.is_terminal)
        self.tasks: dict[str, Any] = {}

    def on_start(self, shards: Sequence[Any]) -> None:
        self.out.done()
        self.bar.start()
        self.tasks["shards"] = self.bar.add_task("shards", total=len(shards))
        self.tasks["rows"] = self.bar.add_task("rows", total=sum(s.rows for s in shards))

    def on_rows(self, done: int, total: int) -> None:
        self.bar.update(self.tasks["rows"], completed=done)

    def on_shard(self, result: Any) -> None:
        self.bar.advance(self.tasks["shards"])
        if self.on_ray:
            self.bar.advance(self.tasks["rows"], result.rows)

    def on_node(self, facts: Any) -> None:
        if not self.bar.disable:  # live status for a person watching; the summary says it for good
            self.bar.console.print(node_line(facts))

    def on_status(self, event: Any) -> None:  # a node's step while it prepares: building, waiting, ...
        if not self.bar.disable:
            steps = {"preparing": "preparing the locked environment", "building": "building the environment",
                     "waiting": "waiting for the environment another actor builds"}
            step = steps.get(event.get("event"), event.get("event"))
            self.bar.console.print(f"node {str(event.get('node_id'))[:12]} ({event.get('hostname')}, "
                                   f"pid {event.get('pid')}): {step}")


def cmd_check(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.check import check

    result = check(args.model, atol=args.atol, rtol=args.rtol, **_session_kwargs(args, out))
    _emit(result, out, render_check)
    # A model that does not load is a worker failure (exit 4), with the report all the same.
    return 0 if result.ok else EXIT_WORKER if result.status == "error" else EXIT_MISMATCH


def cmd_diff(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.diff import diff

    _emit(diff(args.model, python=args.python), out, render_diff)
    return 0


def cmd_env(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.results import EnvResult
    from envlock.commands.run import import_modules, resolve_environment
    from envlock.settings import Settings
    from envlock.sidecar.store import read_sidecar

    sc = read_sidecar(args.model)
    settings = Settings.from_env()
    resolved = resolve_environment(sc, settings=settings, strategy=args.strategy,
                                   allow_python_download=args.allow_python_download,
                                   find_links=tuple(args.find_links), on_event=out.build_event)
    imported = import_modules(sc, resolved, tuple(args.custom_objects), settings=settings)
    _emit(EnvResult(resolved.strategy, Path(resolved.python), resolved.env_path, resolved.built,
                    tuple(imported)), out, render_env)
    return 0


def cmd_export(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.export import export

    _emit(export(args.model, args.format, output=args.output), out, render_export)
    return 0


def cmd_cache_list(args: argparse.Namespace, out: Out) -> int:
    from envlock.commands.results import CachedEnv, CacheListResult
    from envlock.envs.cache import EnvCache
    from envlock.settings import Settings

    infos = EnvCache(Settings.from_env()).list()
    result = CacheListResult(tuple(CachedEnv(i.key, i.path, i.python_version, i.installer, i.created,
                                             i.last_used, i.size) for i in infos))
    _emit(result, out, render_cache_list)
    return 0


def cmd_cache_gc(args: argparse.Namespace, out: Out) -> int:
    from datetime import timedelta

    from envlock.commands.results import CacheGcResult, RemovedEnv
    from envlock.envs.cache import EnvCache
    from envlock.settings import Settings

    removed = EnvCache(Settings.from_env()).gc(
        older_than=timedelta(days=args.older_than) if args.older_than is not None else None,
        max_total_bytes=int(args.max_size * 1e9) if args.max_size is not None else None)
    result = CacheGcResult(tuple(RemovedEnv(r.key, r.path, r.reason, r.size) for r in removed))
    _emit(result, out, render_cache_gc)
    return 0


def _handlers() -> dict[str, Handler]:
    """Looked up when main runs (a test may stand a broken command in for one)."""
    return {"save": cmd_save, "show": cmd_show, "run": cmd_run, "check": cmd_check, "diff": cmd_diff,
            "env": cmd_env, "export": cmd_export, "cache list": cmd_cache_list, "cache gc": cmd_cache_gc}


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
            parser = build_parser(_handlers())
            _complete(parser)
            args = parser.parse_args(raw)
            args.argv = raw
            logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                                format="%(name)s: %(message)s")
            out = Out(args)
            func: Handler = args.func
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


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion (argcomplete): only when a shell asks for it, and only if it is installed."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _stop(out: Out | None) -> None:
    if out is not None:
        out.done()


if __name__ == "__main__":
    sys.exit(main())
