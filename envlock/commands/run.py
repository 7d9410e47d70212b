"""`envlock run` / `envlock.load`: resolve the locked environment, start the worker in it,
prove the probe on this hardware, then predict.

One ``ModelSession`` serves the CLI (``run``, ``env``) and the Python API (``load``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from envlock.commands.results import RunResult, Validation
from envlock.diagnosis.compare import IDENTICAL, MISMATCH, compare_outputs, overall_status
from envlock.envs.strategy import (
    Resolved,
    recorded_environment,
    recorded_settings,
    resolve_environment,
)
from envlock.errors import BadInputError, InputArrayError, MismatchError
from envlock.facts.modelfile import inspect_model
from envlock.settings import Settings
from envlock.sidecar.manifest import RUN_NEEDS
from envlock.sidecar.store import MAIN_MODULE, Sidecar, read_sidecar  # not via saving: 60 ms of start-up
from envlock.sidecar.trust import is_trusted, trust
from envlock.worker.client import WorkerClient

if TYPE_CHECKING:  # numpy is imported where arrays are handled: `envlock env` never needs it
    import numpy as np

Stage = Callable[[str], None]
Progress = Callable[[int, int], None]


# Validation status when every output is sampled at inference: nothing could be compared bitwise.
NOT_COMPARABLE = "not_comparable"


def sampled_outputs(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """Outputs that two runs of the probe in one process gave other bits for, at save."""
    probe = manifest.get("probe") or {}
    if probe.get("repeat_bitwise_equal") is not False:
        return ()
    names = [o["name"] for o in probe.get("outputs") or []]
    varying = probe.get("varying_outputs")
    return tuple(varying if varying is not None else names)


def reproducibility_note(manifest: Mapping[str, Any], validation: Validation | None) -> str | None:
    """What `run` says about a model that samples at inference, and what it did instead."""
    sampled = sampled_outputs(manifest)
    if not sampled:
        return None
    note = (f"this model samples at inference: output(s) {', '.join(sampled)} are not reproducible "
            "bit for bit (two runs at save already gave other bits); they hold new random draws")
    if validation is None:
        return note + "; nothing was validated (--no-validate)"
    if validation.status == NOT_COMPARABLE:
        return note + "; no other output could prove this environment, so the probe was only run"
    return note + (f"; the other output(s) matched the probe ({validation.status.replace('_', ' ')}), "
                   "which is what proves this environment")


def import_modules(sc: Sidecar, resolved: Resolved, modules: tuple[str, ...], *,
                   settings: Settings) -> list[str]:
    """Import ``modules`` (``envlock env --custom-objects``) in the resolved environment, as
    run would before loading, so that a module missing there is found before a run needs it.
    Returns the modules imported; a failure raises WorkerError naming the module."""
    if not modules:
        return []
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    client = WorkerClient(resolved.python, env=recorded_environment(sc, use_recorded=True),
                          log_path=logs / f"env-worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log",
                          cwd=os.getcwd())
    try:
        client.start()
        done = client.request("prepare", {"modules": list(modules), "sys_path": [os.getcwd()]})
        return list(done.get("modules") or [])
    finally:
        client.close()


class ModelSession:
    """A worker in the locked environment with the model loaded. Use as a context manager."""

    def __init__(self, model: str | os.PathLike[str], *, settings: Settings | None = None,
                 strategy: str = "auto", use_recorded_env: bool = True, trust_code: bool = False,
                 unsafe: bool = False, timeout: float | None = None,
                 allow_python_download: bool = False, find_links: tuple[str, ...] = (),
                 on_stage: Stage | None = None, on_build_event: Callable[[Any], None] | None = None,
                 verify_model_file: bool = True, code_first: bool = True,
                 skip_untrusted_code: bool = False, custom_objects: tuple[str, ...] = ()) -> None:
        self.model = Path(model)
        self.settings = settings or Settings.from_env()
        self.strategy = strategy
        self.use_recorded_env = use_recorded_env
        self.trust_code = trust_code
        self.unsafe = unsafe
        self.timeout = timeout
        self.allow_python_download = allow_python_download
        self.find_links = find_links
        self._stage = on_stage or (lambda s: None)
        self._on_build_event = on_build_event
        # run: refuse a changed model file, prefer the sidecar's code, refuse untrusted code.
        # check: observe all three and explain them instead.
        self.verify_model_file = verify_model_file
        self.code_first = code_first
        self.skip_untrusted_code = skip_untrusted_code
        # Modules to import before loading, beyond those the manifest records (--custom-objects).
        self.custom_objects = tuple(custom_objects)
        self.sidecar = read_sidecar(self.model)
        self.sidecar.require(*RUN_NEEDS)
        self.resolved: Resolved | None = None
        self.client: WorkerClient | None = None
        self.seconds: dict[str, float] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="envlock-run-"))
        self.loaded: dict[str, Any] = {}
        self.prepared: dict[str, Any] = {}  # the worker's answer to `prepare` (modules imported...)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ModelSession:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def specs(self) -> list[dict[str, Any]]:
        return list(self.sidecar.manifest["model"]["inputs"])

    def check_model_file(self) -> None:
        info = inspect_model(self.model)
        if info.sha256 != self.sidecar.manifest["model"]["sha256"]:
            raise MismatchError(
                f"model_file_changed: {self.model} is not the file the sidecar was saved with "
                "(its sha256 differs)", cause="model_file_changed",
                hint=f"restore the original file; `envlock check {self.model}` says which layers "
                "changed (saving again would lock the change in)")

    def _code_path(self) -> list[str]:
        code = self.sidecar.file("code")
        if not code.is_dir():
            return []
        if not is_trusted(self.settings, self.sidecar):
            if not self.trust_code and self.skip_untrusted_code:
                return []
            if not self.trust_code:
                raise BadInputError(
                    f"{self.sidecar.path}/code holds custom-object code from a sidecar not saved on "
                    "this machine; it runs when the model loads",
                    hint="read it, then pass --trust-code once to trust this sidecar")
            trust(self.settings, self.sidecar, reason="--trust-code")
        # Import from a private copy of the files just verified: Python would otherwise write
        # __pycache__ into the sidecar, and the files could change between check and import.
        copy = self._tmp / "code"
        if not copy.exists():
            shutil.copytree(code, copy, ignore=shutil.ignore_patterns("__pycache__"))
        return [str(copy)]

    def open(self) -> ModelSession:
        t = time.perf_counter()
        if self.verify_model_file:
            self.check_model_file()
        code_path = self._code_path()
        self._stage("resolving the locked environment")
        self.resolved = resolve_environment(
            self.sidecar, settings=self.settings, strategy=self.strategy,
            allow_python_download=self.allow_python_download, find_links=self.find_links,
            on_event=self._on_build_event)
        self.seconds["environment"] = time.perf_counter() - t
        t = time.perf_counter()
        self._stage(f"starting the worker ({self.resolved.strategy}: {self.resolved.python})")
        self.client = WorkerClient(self.resolved.python,
                                   env=recorded_environment(self.sidecar, use_recorded=self.use_recorded_env),
                                   log_path=self._log_path(), cwd=os.getcwd(), timeout=self.timeout)
        self.client.start()
        customs = self.sidecar.get("custom_objects") or []
        # Not "<unknown>": a registered name that nothing resolved at save names no module.
        modules = sorted({c["module"] for c in customs
                          if c.get("module") and c["module"] not in ("__main__", MAIN_MODULE)
                          and all(part.isidentifier() for part in c["module"].split("."))
                          and not c.get("defined_in_main")})
        if any(c.get("defined_in_main") for c in customs) and code_path:
            modules.append(MAIN_MODULE)
        # Modules imported before loading at save (say, one that only registers classes): their
        # copy in code/, or their installed package. Then the ones given here.
        for rec in self.sidecar.get("custom_object_modules") or []:
            if rec["module"] not in modules and (code_path or not rec.get("vendored")):
                modules.append(rec["module"])
        modules.extend(m for m in self.custom_objects if m not in modules)
        custom_map = {c["qualname"].split(".")[-1]: (MAIN_MODULE, c["qualname"])
                      for c in customs if c.get("defined_in_main")}
        where = "sys_path" if self.code_first else "sys_path_append"
        # --no-recorded-env: this environment as it is, its in-process settings included.
        settings = recorded_settings(self.sidecar) if self.use_recorded_env else {}
        self.prepared = self.client.request("prepare", {where: code_path, "modules": modules,
                                                         "settings": settings})
        self.seconds["worker_start"] = time.perf_counter() - t
        t = time.perf_counter()
        self._stage("loading the model")
        self.loaded = self.client.request("load", {"path": str(self.model.resolve()),
                                                   "safe_mode": not self.unsafe,
                                                   "custom_objects": custom_map,
                                                   "inputs": self.specs})
        self.seconds["load"] = time.perf_counter() - t
        return self

    def _log_path(self) -> Path:
        from envlock.fs import log_dir

        return log_dir(self.settings) / f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"

    def _need(self) -> WorkerClient:
        if self.client is None:
            self.open()
        assert self.client is not None
        return self.client

    # -- work ------------------------------------------------------------------------------
    def probe_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        import numpy as np

        with np.load(self.sidecar.file("probe.npz"), allow_pickle=False) as npz:
            inputs = {k[len("input__"):]: npz[k] for k in npz.files if k.startswith("input__")}
            outputs = {k[len("output__"):]: npz[k] for k in npz.files if k.startswith("output__")}
        return inputs, outputs

    def replay_probe(self, tag: str = "probe") -> dict[str, np.ndarray]:
        import numpy as np

        from envlock.sidecar.arrays import save_npz

        client = self._need()
        inputs, _ = self.probe_arrays()
        pin = self._tmp / f"{tag}-in.npz"
        save_npz(pin, inputs)
        pout = self._tmp / f"{tag}-out.npz"
        meta = client.request("predict", {"input": str(pin), "output": str(pout), "format": "npz",
                                          "batch_size": int(self.sidecar.manifest["probe"]["batch_size"])})
        with np.load(pout, allow_pickle=False) as npz:
            return {m["name"]: npz[m["name"]] for m in meta["outputs"]}

    def validate(self) -> Validation:
        t = time.perf_counter()
        _, reference = self.probe_arrays()
        got = self.replay_probe()
        tol = self.sidecar.manifest["probe"]["tolerance"]
        comps = compare_outputs(reference, got, atol=float(tol["atol"]), rtol=float(tol["rtol"]))
        sampled = sampled_outputs(self.sidecar.manifest)
        judged = [c for c in comps if c.name not in sampled]
        status = overall_status(judged) if judged else NOT_COMPARABLE
        v = Validation(status, tuple(comps), time.perf_counter() - t, sampled=sampled)
        self.seconds["validate"] = v.seconds
        return v

    def predict_file(self, input_path: Path, output: Path, *, batch_size: int = 32,
                     on_progress: Progress | None = None) -> dict[str, Any]:
        """Predict into ``output`` through a temporary file renamed into place (no partial output)."""
        client = self._need()
        npz = output.suffix == ".npz"
        # The worker writes (and keeps its own scratch files) inside this folder; the host removes
        # it whatever happens, so a worker killed mid-predict leaves nothing beside the output.
        scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.envlock-", dir=output.parent))
        tmp = scratch / f"output{output.suffix}"
        t = time.perf_counter()
        try:
            meta = client.request("predict", {"input": str(input_path.resolve()), "output": str(tmp),
                                              "batch_size": batch_size, "format": "npz" if npz else "npy",
                                              "progress_every": 1}, on_progress=on_progress)
            os.replace(tmp, output)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.seconds["predict"] = time.perf_counter() - t
        return dict(meta)

    def predict(self, x: np.ndarray | Mapping[str, np.ndarray], *, batch_size: int = 32) -> Any:
        """Predict in-memory arrays (through files, never the pipe)."""
        import numpy as np

        from envlock.sidecar.arrays import check_input_file, save_npz

        specs = self.specs
        arrays = dict(x) if isinstance(x, Mapping) else {specs[0]["name"]: x}
        pin = self._tmp / "api-in.npz"
        save_npz(pin, arrays)
        check_input_file(pin, specs)
        pout = self._tmp / "api-out.npz"
        meta = self._need().request("predict", {"input": str(pin), "output": str(pout), "format": "npz",
                                                "batch_size": batch_size})
        with np.load(pout, allow_pickle=False) as npz:
            result = {m["name"]: np.array(npz[m["name"]]) for m in meta["outputs"]}
        for p in (pin, pout):
            p.unlink(missing_ok=True)
        return next(iter(result.values())) if len(result) == 1 else result


def default_output(input_path: Path, n_outputs: int) -> Path:
    stem = input_path.name[: -len(input_path.suffix)] if input_path.suffix else input_path.name
    return input_path.with_name(f"{stem}.predictions{'.npz' if n_outputs > 1 else '.npy'}")


def _in_background(fn: Callable[[], int]) -> Callable[[], int]:
    """Run ``fn`` on a daemon thread (it never delays an exit); the result, or its error, on call."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="envlock-nonfinite", daemon=True)
    thread.start()

    def result() -> int:
        thread.join()
        if "error" in box:
            raise box["error"]
        return int(box["value"])

    return result


def run(model: str | os.PathLike[str], input_path: str | os.PathLike[str], *,
        output: str | os.PathLike[str] | None = None, batch_size: int = 32, validate: bool = True,
        on_progress: Progress | None = None, **session_kwargs: Any) -> RunResult:
    """Validate on this hardware, then predict ``input_path`` into ``output``."""
    from envlock.fs import guard_output
    from envlock.sidecar.arrays import check_input_file, nonfinite_rows

    inp = Path(input_path)
    session = ModelSession(model, **session_kwargs)
    try:
        n_outputs = len(session.sidecar.manifest["model"].get("outputs") or [1])
        rows = check_input_file(inp, session.specs)  # exit 2 before any environment is built
        out = Path(output) if output is not None else default_output(inp, n_outputs)
        if not out.parent.is_dir():
            raise BadInputError(f"{out}: the folder {out.parent} does not exist",
                                hint="create it first, or pass another --output")
        # Never over the model, its sidecar or the input; not a folder; a folder it can write in.
        guard_output(out, model=session.model, sidecar=session.sidecar.path, inputs=[inp])
        if out.suffix not in (".npy", ".npz"):
            raise InputArrayError(f"{out}: the output must be a .npy or .npz file")
        if n_outputs > 1 and out.suffix != ".npz":
            raise InputArrayError(f"the model has {n_outputs} outputs: write them to an .npz file")
        if batch_size < 1:
            raise BadInputError("--batch-size must be at least 1")
        # Counted on a thread while the worker starts (reading a 2 GB input takes ~3 s).
        nonfinite = _in_background(lambda: nonfinite_rows(inp))
        session.open()
        validation = None
        if validate:
            validation = session.validate()
            if validation.status == MISMATCH:
                worst = max((c for c in validation.outputs if c.name not in validation.sampled),
                            key=lambda c: c.max_abs_diff)
                raise MismatchError(
                    f"predictions on this machine do not match the lock: output {worst.name} differs "
                    f"by up to {worst.max_abs_diff:.3g} ({worst.share_out_of_tolerance:.1%} of elements "
                    "out of tolerance)",
                    hint=f"`envlock check {session.model}` explains why; --no-validate runs anyway")
        meta = session.predict_file(inp, out, batch_size=batch_size, on_progress=on_progress)
        assert session.resolved is not None
        return RunResult(
            model=session.model, output=out, rows=rows, outputs=tuple(meta["outputs"]),
            strategy=session.resolved.strategy, python=session.resolved.python,
            env_path=session.resolved.env_path, built=session.resolved.built, validation=validation,
            seconds=dict(session.seconds), sampled_outputs=sampled_outputs(session.sidecar.manifest),
            note=reproducibility_note(session.sidecar.manifest, validation),
            nonfinite_rows=nonfinite(),
        )
    finally:
        session.close()


def load(model: str | os.PathLike[str], **session_kwargs: Any) -> ModelSession:
    """The Python API: a session whose ``predict(x)`` runs in the locked environment.

    The session starts lazily, on first use or on ``with``; close it (or use ``with``).
    """
    return ModelSession(model, **session_kwargs)


__all__ = ["IDENTICAL", "MISMATCH", "ModelSession", "RunResult", "Validation", "load", "run"]
