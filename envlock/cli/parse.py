"""The command line's parser: argparse, with every option checked at parse time (exit 2).

``build_parser`` takes the command handlers (``envlock.cli`` owns them) so that this module
knows the options and nothing of what the commands do.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import envlock
from envlock.errors import BadInputError

COMPLETION_SHELLS = ("bash", "zsh", "fish", "tcsh")

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


Handler = Callable[[argparse.Namespace, Any], int]
COMMANDS = ("save", "show", "run", "check", "diff", "env", "export", "cache list", "cache gc")


class _PrintCompletion(argparse.Action):
    """``--print-completion SHELL``: the shell code that completes envlock's arguments (argcomplete),
    for ``eval "$(envlock --print-completion bash)"`` in a shell's start-up file."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            import argcomplete
        except ImportError:
            raise BadInputError("shell completion needs argcomplete",
                                hint="pip install 'envlock[completion]'") from None
        sys.stdout.write(argcomplete.shellcode(["envlock"], shell=str(values)))
        parser.exit(0)


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The parser of every command; ``handlers`` maps each of COMMANDS to its function."""
    parser = _Parser(prog="envlock", description=envlock.__doc__)
    parser.add_argument("--version", action="version", version=f"envlock {envlock.__version__}")
    parser.add_argument("--print-completion", action=_PrintCompletion, choices=COMPLETION_SHELLS,
                        metavar="SHELL",
                        help=f"print the shell completion code ({', '.join(COMPLETION_SHELLS)})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _save_parser(sub, handlers["save"])
    p = sub.add_parser("show", help="the manifest, readable")
    p.add_argument("model", type=_model)
    _finish(p, handlers["show"])
    _run_parser(sub, handlers["run"])
    _check_parser(sub, handlers["check"])
    _diff_parser(sub, handlers["diff"])
    _env_parser(sub, handlers["env"])
    _export_parser(sub, handlers["export"])
    _cache_parser(sub, handlers)
    return parser


if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[_Parser]


def _finish(p: argparse.ArgumentParser, handler: Handler) -> None:
    """The options every command has, and the function that runs it."""
    _common(p)
    p.set_defaults(func=handler)


def _save_parser(sub: _Subparsers, handler: Handler) -> None:
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
    _finish(p, handler)


def _run_parser(sub: _Subparsers, handler: Handler) -> None:
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
    _finish(p, handler)


def _check_parser(sub: _Subparsers, handler: Handler) -> None:
    p = sub.add_parser("check", help="replay the probe on this machine and explain every difference")
    p.add_argument("model", type=_model)
    p.add_argument("--atol", type=_TOLERANCE, help="absolute tolerance (default: as recorded at save)")
    p.add_argument("--rtol", type=_TOLERANCE, help="relative tolerance (default: as recorded at save)")
    _session_args(p)
    _finish(p, handler)


def _diff_parser(sub: _Subparsers, handler: Handler) -> None:
    p = sub.add_parser("diff", help="the lock against this (or --python's) environment")
    p.add_argument("model", type=_model)
    p.add_argument("--python", type=_interpreter,
                   help="the interpreter whose environment to compare (default: this one)")
    _finish(p, handler)


def _env_parser(sub: _Subparsers, handler: Handler) -> None:
    p = sub.add_parser("env", help="build (or find) the locked environment and print its path")
    p.add_argument("model", type=_model)
    p.add_argument("--strategy", default="locked", choices=["auto", "current", "venv", "conda"],
                   help="default: the locked environment itself (conda when the sidecar holds a "
                        "conda-lock.yml, else venv), never this interpreter")
    p.add_argument("--allow-python-download", action="store_true")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR", type=_model)
    _custom_objects_arg(p)
    _finish(p, handler)


def _export_parser(sub: _Subparsers, handler: Handler) -> None:
    p = sub.add_parser("export", help="render the lock for another tool (a Dockerfile, a requirements file)")
    p.add_argument("model", type=_model)
    p.add_argument("--format", "-f", required=True, metavar="FORMAT",
                   help="dockerfile, requirements, ... (see envlock.commands.export.FORMATS)")
    p.add_argument("--output", "-o", type=_path, help="write here (default: stdout)")
    _finish(p, handler)


def _cache_parser(sub: _Subparsers, handlers: Mapping[str, Handler]) -> None:
    p = sub.add_parser("cache", help="the environment cache")
    csub = p.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    q = csub.add_parser("list", help="cached environments")
    _finish(q, handlers["cache list"])
    q = csub.add_parser("gc", help="remove environments by age of last use and by total size")
    q.add_argument("--older-than", type=_DAYS, metavar="DAYS", help="remove those unused for DAYS")
    q.add_argument("--max-size", type=_GIGABYTES, metavar="GB", help="then remove the oldest until under GB")
    _finish(q, handlers["cache gc"])


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

