"""The command line's output for a person: rich tables and lines, one function per result.

Progress goes to stderr, results to stdout; ``--json`` output is the results' own ``to_json()``
(written by :meth:`Out.emit_json`). Nothing here calls the core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


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


def render_save(result: Any, out: Out, *, vendor: bool) -> None:
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
    if vendor:
        wheels = result.sidecar / "wheels"
        count = sum(1 for _ in wheels.iterdir()) if wheels.is_dir() else 0
        out.print(f"  wheels     {count} file(s) in {wheels}: rebuilds need no index")
    for w in result.warnings:
        out.err.print(f"[yellow]warning:[/] {w}")


def render_show(result: Any, out: Out) -> None:
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


def _keras_of(m: dict[str, Any]) -> str:
    """The Keras version the file records; else the environment's, said to be that."""
    version = m["model"].get("keras_version")
    if version:
        return f"Keras {version}"
    fw = (m.get("framework") or {}).get("versions") or {}
    env = fw.get("tf_keras") or fw.get("keras")
    return f"Keras {env} in the environment, the file records none" if env else "Keras version not recorded"


def warn_nonfinite(result: Any, out: Out) -> None:
    """Predicted all the same (Keras would), but a NaN in is usually a bug upstream: said even
    with --json (on stderr; the document counts the rows)."""
    if result.nonfinite_rows:
        out.err.print(f"[yellow]warning:[/] {result.nonfinite_rows} of {result.rows} input row(s) "
                      "hold NaN or infinite values; their predictions are likely NaN too")


def render_run(result: Any, out: Out) -> None:
    v = result.validation
    if v is not None and not result.sampled_outputs:
        out.print(f"[green]probe {v.status.replace('_', ' ')}[/] on this machine")
    if result.note:
        out.print(f"[yellow]not reproducible bit for bit:[/] {result.note}")
    where = f"{result.strategy}" + (f" {result.env_path}" if result.env_path else f" {result.python}")
    out.print(f"[bold green]wrote[/] {result.output} ({result.rows} rows) using {where}")


def render_shards(result: Any, out: Out) -> None:
    lines: dict[str, int] = {}  # the actors of one node usually say the same: once, counted
    for facts in result.nodes:
        lines[node_line(facts)] = lines.get(node_line(facts), 0) + 1
    for line, count in lines.items():
        out.print(line + (f" ({count} actors)" if count > 1 else ""))
    on_ray = f" on Ray ({result.ray_address}, {len(result.nodes)} actor(s))" if result.ray_address else ""
    out.print(f"[bold green]wrote[/] {len(result.shards)} shard(s), {result.rows} rows, "
              f"to {result.output_dir}{on_ray}")


def node_line(facts: Any) -> str:
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


def render_check(result: Any, out: Out) -> None:
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


def render_diff(result: Any, out: Out) -> None:
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


def render_export(result: Any, out: Out) -> None:
    if result.output is None:
        sys.stdout.write(result.text)  # as is: no markup, wrapping or colour
    else:
        out.print(f"[bold green]wrote[/] {result.output} ({result.format})")


def render_env(result: Any, out: Out) -> None:
    sys.stdout.write(f"{result.prefix}\n")  # the path alone, even with --quiet: it is the result


def render_cache_list(result: Any, out: Out) -> None:
    t = Table("key", "python", "installer", "last used", "size")
    for i in result.environments:
        t.add_row(i.key[:16], i.python, i.installer, i.last_used.strftime("%Y-%m-%d %H:%M"),
                  f"{i.size / 1e6:.0f} MB")
    out.print(t if result.environments else "no cached environments")


def render_cache_gc(result: Any, out: Out) -> None:
    for r in result.removed:
        out.print(f"removed {r.key[:16]} ({r.reason}, {r.size / 1e6:.0f} MB)")
    freed = f", up to {result.freed / 1e6:.0f} MB freed" if result.removed else ""
    out.print(f"{len(result.removed)} removed{freed}")
