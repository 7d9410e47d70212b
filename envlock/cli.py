"""The command line: parse arguments, call the core, render what comes back.

Nothing in the core prints or exits; this module maps EnvlockError subclasses to the exit
codes of DESIGN section 1 and prints one line (plus one line of advice) per failure. A
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import envlock
from envlock.errors import EXIT_BAD_INPUT, EnvlockError

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's usage dump is long; one line and the documented exit code.
        sys.stderr.write(f"envlock: error: {message}\n(see `envlock {self.prog.split()[-1]} --help`)\n"
                         if " " in self.prog else f"envlock: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no human output, only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="envlock", description=envlock.__doc__)
    parser.add_argument("--version", action="version", version=f"envlock {envlock.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("save", help="capture the environment and reference predictions of a saved model")
    p.add_argument("model", help="a .keras file, a legacy .h5 file or a SavedModel directory")
    p.add_argument("--probe", type=Path, help="real inputs (.npy, or .npz with one array per input)")
    p.add_argument("--custom-objects", action="append", default=[], metavar="MODULE",
                   help="import MODULE before loading (repeatable)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="save even if the weights loaded back differ (weights_not_restored)")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0, help="seed of generated probe inputs")
    _common(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("show", help="the manifest, readable")
    p.add_argument("model")
    _common(p)
    p.set_defaults(func=cmd_show)
    return parser


# -- rendering ---------------------------------------------------------------------------

class Out:
    """Where human output goes (stderr for progress, stdout for results), honouring --quiet."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False)) or self.json
        self.console = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def print(self, *objs: Any) -> None:
        if not self.quiet:
            self.console.print(*objs)

    def stage(self, text: str) -> None:
        if not self.quiet:
            self.err.print(f"[dim]… {text}[/dim]")

    def emit_json(self, doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def cmd_save(args: argparse.Namespace, out: Out) -> int:
    from envlock.saving import SaveOptions, lock

    command = "envlock save " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "envlock save"
    opts = SaveOptions(probe=args.probe, custom_object_modules=tuple(args.custom_objects),
                       allow_mismatch=args.allow_mismatch, atol=args.atol, rtol=args.rtol,
                       seed=args.seed, command=command)
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
    t.add_row("model", f"{model['file']} ({model['format']}, Keras {model.get('keras_version')}), "
                       f"sha256 {model['sha256'][:16]}…")
    t.add_row("inputs", ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in model.get("inputs", [])))
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
    for c in m.get("custom_objects", []):
        t.add_row("custom", f"{c['module']}.{c['qualname']} (source {str(c.get('source_sha256'))[:12]}…)"
                  + (f" → {c['vendored']}" if c.get("vendored") else ""))
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


def _report_error(err: EnvlockError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"envlock: error: {err}\n")
    if err.hint:
        sys.stderr.write(f"  hint: {err.hint}\n")
    log_tail = getattr(err, "log_tail", "")
    if log_tail and debug:
        sys.stderr.write(log_tail.rstrip() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    out = Out(args)
    func: Callable[[argparse.Namespace, Out], int] = args.func
    try:
        return func(args, out)
    except EnvlockError as err:
        _report_error(err, args.debug)
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("envlock: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `envlock show x | head`: stdout closed early is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
