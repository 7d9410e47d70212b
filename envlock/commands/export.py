"""`envlock export MODEL --format F`: the sidecar rendered for another tool, from templates/.

``FORMATS`` maps a format name to a function that takes the model path and its (verified)
sidecar and returns the text; adding a format is one function and one entry. Writing to a file
goes through a temporary file renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import envlock
from envlock import templating
from envlock.commands.results import ExportResult
from envlock.errors import BadInputError
from envlock.facts.modelfile import sidecar_path
from envlock.fs import atomic_write
from envlock.locking import condarender
from envlock.sidecar.store import Sidecar, read_sidecar
from envlock.worker.payload.framework import ENV_VARS

# Docker's names for the machines that the official python images are built for.
_DOCKER_PLATFORMS = {"x86_64": "linux/amd64", "amd64": "linux/amd64", "aarch64": "linux/arm64",
                     "arm64": "linux/arm64"}


@dataclass(frozen=True)
class ExportContext:
    """What every format may use: the model, its sidecar, and where the text will live."""

    model: Path
    sidecar: Sidecar
    output: Path | None

    @property
    def base(self) -> Path:
        """The folder relative paths in the text start from: the output's, else the model's."""
        return (self.output.parent if self.output else self.model.parent).absolute()

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path.absolute(), self.base)).as_posix()


Exporter = Callable[[ExportContext], str]


def _lock_body(sc: Sidecar) -> str:
    """requirements.lock.txt without pip-compile's header (which names the command that wrote it)."""
    lines = sc.file("requirements.lock.txt").read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    return "\n".join(lines[i:]).rstrip("\n") + "\n"


def _vendored(sc: Sidecar) -> bool:
    return sc.file("wheels").is_dir() and bool(sc.get("packages", "vendored", "complete"))


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def requirements(ctx: ExportContext) -> str:
    """The lock for plain ``pip install -r``: hash-checked, with the sidecar's wheels when vendored."""
    m = ctx.sidecar.manifest
    python = m["python"]
    return templating.render(
        "requirements.txt.j2",
        model=ctx.model.name, envlock_version=envlock.__version__, created=m.get("created"),
        python_version=python["version"], python_minor=_minor(str(python["version"])),
        implementation=python.get("implementation", "cpython"), platform=m["platform"],
        complete=bool(m["packages"].get("complete")) and not m["packages"].get("missing_hashes"),
        risks=m["packages"].get("risks") or [],
        wheels=ctx.relative(ctx.sidecar.file("wheels")) if _vendored(ctx.sidecar) else None,
        body=_lock_body(ctx.sidecar),
    )


def _image_tag(model: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", model.name.lower()).strip("-._")
    return f"envlock-{stem or 'model'}"


def dockerfile(ctx: ExportContext) -> str:
    """A Dockerfile on the recorded Python that builds the locked environment and runs the model.

    The build context is the model's folder: the model and its sidecar are copied in as they
    are, and ``envlock env`` builds the environment at image build time, so a container starts
    straight into ``envlock run``.
    """
    m = ctx.sidecar.manifest
    plat = m["platform"]
    if str(plat.get("os", "")).lower() != "linux":
        raise BadInputError(
            f"{ctx.model} was saved on {plat.get('os')}: its locked wheels are for that OS and do "
            "not install in a Linux container",
            hint="save the model on Linux (or in a Linux container) to export a Dockerfile")
    machine = str(plat.get("machine", ""))
    if machine not in _DOCKER_PLATFORMS:
        raise BadInputError(f"no official python image for the recorded machine {machine!r}")
    libc = plat.get("libc") or {}
    if isinstance(libc, dict) and libc.get("name") not in (None, "glibc"):
        raise BadInputError(f"{ctx.model} was saved on {libc.get('name')}; the python:*-slim images "
                            "use glibc, and musllinux wheels do not install there")
    model_dir = ctx.model.parent.absolute()
    sidecar_dir = sidecar_path(ctx.model).absolute()
    tag = _image_tag(ctx.model)
    if ctx.output is not None and ctx.output.parent.absolute() != model_dir:
        # COPY paths are relative to the build context, which must be the model's folder.
        hint = f"docker build -f {ctx.output} -t {tag} {model_dir}"
    else:
        hint = f"docker build -f {ctx.output.name if ctx.output else 'Dockerfile'} -t {tag} ."
    env = m.get("determinism", {}).get("env") or {}
    python = m["python"]
    gpus = (m.get("gpu") or {}).get("gpus") or []
    return templating.render(
        "Dockerfile.j2",
        model=ctx.model.name, sidecar=sidecar_dir.name, envlock_version=envlock.__version__,
        saved_by=m.get("envlock_version"), created=m.get("created"),
        python_version=python["version"], docker_platform=_DOCKER_PLATFORMS[machine],
        libc=libc if isinstance(libc, dict) else {}, vendored=_vendored(ctx.sidecar),
        has_code=ctx.sidecar.file("code").is_dir(), tag=tag, build_hint=hint,
        recorded_env=[(k, str(env[k])) for k in ENV_VARS if env.get(k) is not None],
        cuda=bool((m.get("cuda") or {}).get("is_cuda_build")), gpus=[g.get("name") for g in gpus],
    )


FORMATS: dict[str, Exporter] = {
    "dockerfile": dockerfile,
    "requirements": requirements,
    "environment.yml": condarender.export_environment_yml,
    "explicit": condarender.export_explicit,
}


def export(model: str | os.PathLike[str], fmt: str, *, output: str | os.PathLike[str] | None = None
           ) -> ExportResult:
    """Render ``fmt`` for ``model``'s sidecar; write it to ``output`` when given."""
    exporter = FORMATS.get(fmt)
    if exporter is None:
        raise BadInputError(f"unknown export format {fmt!r} (choose from {', '.join(sorted(FORMATS))})")
    path = Path(model)
    sc = read_sidecar(path)
    out = Path(output) if output is not None else None
    if out is not None:
        from envlock.fs import guard_output

        guard_output(out, model=path, sidecar=sc.path, make_parent=True)
    text = exporter(ExportContext(path, sc, out))
    if out is not None:
        atomic_write(out, text, mode=0o644)
    return ExportResult(path, fmt, text, out)
